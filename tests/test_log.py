"""The event log: seq, columns, timestamps, payloads, hash chain, append-only, duplicates, quarantine."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import time

import pytest
from helpers import (
    MT,
    at,
    bare,
    bayeux,
    data,
    envelope,
    feed,
    fresh_store,
    log_rows,
    projection_snapshot,
    table_rows,
)
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from store import log
from store.db import open_engine, open_reader, open_store, parse_url, probe_writable, write_transaction
from store.errors import StoreError, StoreLocked
from store.export import export_lines
from store.ingest.files import BATCH_LINES, import_file, import_stream
from store.locks import lock_for_append
from store.notifications import parse_line
from store.projections import runner
from store.reading import pages, select_in
from store.schema import event_log, imported_files, request_outcomes, workitem_transitions, workitems
from store.simulate import simulate
from store.verify import verify

UTC = dt.UTC
STATUS_CHANGE = '{"data": {"messageType": "' + MT + '", "notificationType": "StatusChange", "workitem": '


def now():
    return dt.datetime.now(UTC)


def test_three_shapes_sources_and_received_at(engine, tmp_path):
    path = tmp_path / "capture.jsonl"
    env_msg = bayeux(data("StatusChange", "W1", state="Invited"), mid="1")
    path.write_text("\n".join([
        envelope(env_msg, "agent-7", "2026-11-02T09:30:00.123456+01:00"),
        bayeux(data("StatusChange", "W1", state="Processing", ref=8), mid="2"),
        bare(data("PropertiesUpdated", "W1", user_data={"k": "v"})),
    ]) + "\n")
    before = now()
    result = import_file(engine, path)
    after = now()
    assert (result.appended, result.duplicates, result.quarantined) == (3, 0, 0)
    assert (result.first_seq, result.last_seq) == (1, 3)
    with engine.connect() as conn:
        rows = log_rows(conn)
    assert [r["seq"] for r in rows] == [1, 2, 3]
    assert [r["source"] for r in rows] == ["agent-7", "file:capture.jsonl", "file:capture.jsonl"]
    assert rows[0]["received_at"] == dt.datetime(2026, 11, 2, 8, 30, 0, 123456, tzinfo=UTC)
    for r in rows[1:]:
        assert before <= r["received_at"] <= after
    assert rows[0]["payload"] == env_msg
    assert rows[1]["reference_id"] == "8"
    assert [r["channel"] for r in rows] == ["/v2/me/workitems", "/v2/me/workitems", None]
    assert [r["message_id"] for r in rows] == ["1", "2", None]
    assert [r["notification_type"] for r in rows] == ["StatusChange", "StatusChange", "PropertiesUpdated"]
    assert {r["message_type"] for r in rows} == {MT}
    assert {r["workitem_id"] for r in rows} == {"W1"}
    assert all(r["duplicate_of"] is None and r["quarantine_reason"] is None for r in rows)


def test_seq_is_gapless_across_imports(engine, tmp_path):
    total = 0
    for i, n in enumerate((5, 1, 17)):
        result = feed(engine, simulate(n, agents=2, seed=i), file_name=f"f{i}")
        assert (result.first_seq, result.last_seq) == (total + 1, total + n)
        total += n
    with engine.connect() as conn:
        seqs = conn.execute(select(event_log.c.seq).order_by(event_log.c.seq)).scalars().all()
        files = table_rows(conn, imported_files)
    assert seqs == list(range(1, total + 1))
    assert [(f["file_name"], f["rows"], f["first_seq"], f["last_seq"]) for f in files] == [
        ("f0", 5, 1, 5), ("f1", 1, 6, 6), ("f2", 17, 7, 23)]


def test_blank_lines_are_skipped_not_logged(engine):
    result = feed(engine, [bare(data()), "", "   ", bare(data())])
    assert (result.appended, result.blank) == (2, 2)


def test_received_at_storage_is_utc_and_queryable(engine):
    feed(engine, [envelope(bare(data()), "s", "2026-11-02T23:59:59.000001-05:00"), bare(data())])
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.execute(text(
                "SELECT received_at, julianday(received_at), datetime(received_at) FROM event_log ORDER BY seq")).all()
            for stamp, julian, _ in rows:
                assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", stamp), stamp
                assert julian is not None
            assert rows[0][0] == "2026-11-03 04:59:59.000001"
            assert rows[0][2] == "2026-11-03 04:59:59"
            recent = conn.execute(text(
                "SELECT count(*) FROM event_log WHERE received_at > datetime('now', '-1 hour')")).scalar_one()
            assert recent == 1  # only the line read just now
        else:
            kind = conn.execute(text("SELECT pg_typeof(received_at)::text FROM event_log LIMIT 1")).scalar_one()
            assert kind == "timestamp with time zone"
            utc = conn.execute(text(
                "SELECT to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') "
                "FROM event_log WHERE seq = 1"
            )).scalar_one()
            assert utc == "2026-11-03 04:59:59.000001"


def test_payload_hashes_and_chain(engine):
    lines = [bayeux(data("StatusChange", f"W{i}", state="Invited"), mid=str(i)) for i in range(4)]
    lines.append("not json at all")
    lines.append(bayeux(data("StatusChange", "W0", state="Invited"), mid="0"))  # duplicate
    feed(engine, lines, source="s1")
    with engine.connect() as conn:
        rows = log_rows(conn)
        assert log.head(conn) == (6, rows[-1]["chain_hash"])
    prev = log.GENESIS_HASH
    for line, r in zip(lines, rows, strict=True):
        assert r["payload"] == line
        assert r["payload_sha256"] == hashlib.sha256(line.encode()).hexdigest()
        expected = log.chain_hash(prev, r["seq"], r["received_at"], r["source"], r["payload_sha256"],
                                  r["duplicate_of"], r["quarantine_reason"])
        assert r["chain_hash"] == expected
        prev = expected
    assert rows[5]["duplicate_of"] == 1 and rows[4]["quarantine_reason"].startswith("not JSON")
    assert len({r["chain_hash"] for r in rows}) == 6


def test_empty_log_head_is_genesis(engine):
    with engine.connect() as conn:
        assert log.head(conn) == (0, log.GENESIS_HASH)


@pytest.mark.parametrize("statement", [
    "UPDATE event_log SET payload = 'x' WHERE seq = 1",
    "UPDATE event_log SET quarantine_reason = NULL",
    "DELETE FROM event_log WHERE seq = 2",
    "DELETE FROM event_log",
])
def test_event_log_refuses_update_and_delete(engine, statement):
    feed(engine, [bare(data()), bare(data("PropertiesUpdated"))])
    with engine.connect() as conn:
        before = log_rows(conn)
    with pytest.raises(DBAPIError, match="append-only"):
        with engine.begin() as conn:
            conn.execute(text(statement))
    with engine.connect() as conn:
        assert log_rows(conn) == before and len(before) == 2


@pytest.mark.postgres
def test_event_log_refuses_truncate_on_postgresql(pg_url):
    engine = open_store(pg_url)
    feed(engine, [bare(data())])
    with pytest.raises(DBAPIError, match="append-only"):
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE event_log"))
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(event_log)).scalar_one() == 1
    engine.dispose()


# -- duplicates --------------------------------------------------------------------------------

def test_duplicates_with_ids_within_a_batch_and_across_imports(engine):
    first = bayeux(data("StatusChange", "W1", state="Invited", ref=1), mid="m1")
    same_id_other_text = bayeux(data("StatusChange", "W1", state="Completed", ref=2), mid="m1")
    r1 = feed(engine, [first, bayeux(data("PropertiesUpdated", "W1"), mid="m2"), first, same_id_other_text],
              source="A")
    assert (r1.appended, r1.duplicates) == (4, 1)  # a message sent again has the same id AND text
    r2 = feed(engine, [
        first,  # same source, across imports
        first,  # and again
        envelope(bayeux(data("StatusChange", "W2", state="Invited"), mid="m1"), "C", at(0)),  # other source
        bare(data("StatusChange", "W1", state="Completed")),  # no id, no envelope: never a duplicate
        bare(data("StatusChange", "W1", state="Completed")),
    ], source="B")
    r3 = feed(engine, [same_id_other_text], source="A")
    assert (r2.duplicates, r3.duplicates) == (1, 1)
    r4 = feed(engine, [first], source="B")
    assert r4.duplicates == 1
    with engine.connect() as conn:
        dup = {r["seq"]: r["duplicate_of"] for r in log_rows(conn)}
    assert dup == {1: None, 2: None, 3: 1, 4: None, 5: None, 6: 5, 7: None, 8: None, 9: None, 10: 4, 11: 5}


def test_ids_restarting_at_1_never_make_different_notifications_duplicates(engine):
    """A server restart (or a second capture of the same agents) numbers messages from 1 again:
    only a message with the same text is a copy."""
    def capture(state: str) -> list[str]:
        return [envelope(bayeux(data("StatusChange", f"W{i}", state=state, ref=i), mid=str(i)), "agent-1", at(i))
                for i in range(1, 50)]
    feed(engine, capture("Invited"), file_name="first")
    result = feed(engine, capture("Processing"), file_name="second")
    assert result.duplicates == 0
    with engine.connect() as conn:
        assert all(r["duplicate_of"] is None for r in log_rows(conn))


def test_envelope_sources_decide_duplicates(engine):
    message = bayeux(data("StatusChange", "W1", state="Invited"), mid="42")
    feed(engine, [envelope(message, "agent-1", at(0)), envelope(message, "agent-2", at(1)),
                  envelope(message, "agent-1", at(2))], source="ignored")
    with engine.connect() as conn:
        rows = log_rows(conn)
    assert [(r["source"], r["duplicate_of"]) for r in rows] == [("agent-1", None), ("agent-2", None), ("agent-1", 1)]


def test_duplicates_are_not_projected(engine):
    invited = bayeux(data("StatusChange", "W1", state="Invited", caps=["Accept"], ref=1), mid="1")
    feed(engine, [invited, invited, invited])
    runner.project(engine)
    with engine.connect() as conn:
        (w,) = table_rows(conn, workitems)
        assert (w["state"], w["capabilities"], w["notification_count"], w["error_count"]) == \
            ("Invited", ["Accept"], 1, 0)
        assert [t["to_state"] for t in table_rows(conn, workitem_transitions)] == ["Invited"]
        assert [(o["reference_id"], o["notification_count"]) for o in table_rows(conn, request_outcomes)] == [("1", 1)]
        assert verify(conn).ok


# -- quarantine ----------------------------------------------------------------------------------

QUARANTINE_LINES = [
    ('{"data": {"messageType": "WorkitemStateChangeMessage", "notificationType": "StatusChange", '
     '"workitem": {"id": "Q0"', "not JSON"),
    ('[{"data": {"workitem": {"id": "Q1"}}}]', "not a JSON object"),
    (json.dumps({"channel": "/v2/me/workitems", "id": "q2", "data": "Q2"}), "data is not an object"),
    (json.dumps({"channel": "/v2/me/workitems", "id": "q3"}), "data is missing"),
    (bare(data("StatusChange", "Q4", state="Invited", ref=4, message_type="CallStateChangeMessage")), "messageType"),
    (bare(data("Deleted", "Q5", state="Deleted", ref=5)), "notificationType"),
    (bare(data("StatusChange", None, state="Invited", ref=6)), "StatusChange without workitem.id"),
    (bare(data("PropertiesUpdated", None, user_data={"a": 1}, ref=7)), "PropertiesUpdated without workitem.id"),
    (bare(data("Error", None, code=500, message="boom")), "Error with neither referenceId nor workitem.id"),
    (envelope(bare(data("StatusChange", "Q9", state="Invited")), "s", "not a time"), "envelope received_at"),
]


def test_each_quarantined_line_is_logged_with_its_reason_and_not_projected(engine):
    good = bare(data("StatusChange", "GOOD", state="Invited", ref=100))
    result = feed(engine, [line for line, _ in QUARANTINE_LINES] + [good], source="s")
    assert (result.appended, result.quarantined, result.duplicates) == \
        (len(QUARANTINE_LINES) + 1, len(QUARANTINE_LINES), 0)
    runner.project(engine)
    with engine.connect() as conn:
        rows = log_rows(conn)
        for (line, reason), row in zip(QUARANTINE_LINES, rows[:-1], strict=True):
            assert row["quarantine_reason"] is not None and reason in row["quarantine_reason"], (line, row)
            assert row["payload"] == line
        assert rows[-1]["quarantine_reason"] is None
        assert [w["workitem_id"] for w in table_rows(conn, workitems)] == ["GOOD"]
        assert [t["workitem_id"] for t in table_rows(conn, workitem_transitions)] == ["GOOD"]
        assert [o["reference_id"] for o in table_rows(conn, request_outcomes)] == ["100"]
        assert [e.seq for chunk in log.read_events(conn, 0) for e in chunk] == [len(rows)]
        assert verify(conn).ok


def test_json_that_postgresql_cannot_store_is_quarantined_not_fatal(engine):
    """NaN/Infinity, \\u0000 and lone surrogates parse in Python but cannot be stored in
    PostgreSQL text/jsonb (nor, for surrogates, encoded as UTF-8 at all): quarantined on both engines."""
    bad = [
        bare(data("StatusChange", "N1", user_data={"x": float("nan")})),
        STATUS_CHANGE + '{"id": "N2", "userData": {"x": 1e400}}}}',
        STATUS_CHANGE + '{"id": "N3\\u0000"}}}',
        STATUS_CHANGE + '{"id": "N4", "userData": {"a": "\\u0000"}}}}',
        STATUS_CHANGE + '{"id": "N5\\ud800"}}}',
        '{"received_at": "2026-11-02T08:00:00Z", "source": "agent\\udc00", "message": '
        + bare(data("StatusChange", "N6")) + "}",
    ]
    fine = [
        STATUS_CHANGE + '{"id": "OK1\\u00e9\\ud83d\\ude00"}}}',
        STATUS_CHANGE + '{"id": "OK2", "userData": {"p": "a\\\\u0000"}}}}',
    ]
    result = feed(engine, bad + fine)
    assert (result.appended, result.quarantined) == (8, 6)
    runner.project(engine)
    with engine.connect() as conn:
        assert [w["workitem_id"] for w in table_rows(conn, workitems)] == ["OK1\u00e9\U0001F600", "OK2"]
        assert table_rows(conn, workitems)[1]["user_data"] == {"p": "a\\u0000"}
        assert verify(conn).ok


def test_append_uses_the_callers_source_and_time_only_when_the_line_has_none(engine):
    t = at(100)
    batch = [parse_line(bare(data())), parse_line(envelope(bare(data()), "own", at(5)))]
    with write_transaction(engine) as conn:
        result = log.append(conn, batch, source="caller", received_at=t)
    assert (result.first_seq, result.last_seq, result.appended) == (1, 2, 2)
    with engine.connect() as conn:
        rows = log_rows(conn)
    assert [(r["source"], r["received_at"]) for r in rows] == [("caller", t), ("own", at(5))]
    with write_transaction(engine) as conn:
        assert log.append(conn, [], source="x", received_at=t).appended == 0


def test_a_failed_import_appends_nothing(engine):
    def stream():
        for i in range(BATCH_LINES + 10):
            yield (bare(data("StatusChange", f"W{i}")) + "\n").encode()
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="disk went away"):
        import_stream(engine, stream(), file_name="broken", source="s")
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(event_log)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(imported_files)).scalar_one() == 0
    result = feed(engine, [bare(data())])
    assert result.first_seq == 1  # no seq was burnt


# -- export, then import into an empty database ---------------------------------------------------

ODD_LINES = [
    "[1, 2]", "42", "null", '"just a string"',  # JSON, but not objects
    "  " + bayeux(data("StatusChange", "P1", state="Invited"), mid="p1") + " \t",  # padded message
    "\t" + bare(data("PropertiesUpdated", "P1", caps=["X"])),
    b'{"data": "caf\xe9"}',  # Latin-1, not UTF-8
    b'\xff\xfe{"data": 1}',
    b'{"data": 1}\x00',  # NUL byte
    b'{"a": "x\x00y"}',
    envelope(bare(data()), "s", "not a time"),
    envelope(bare(data()), "", "2026-11-02T08:00:00Z"),
    envelope(bare(data()), 7, "2026-11-02T08:00:00Z"),
    '{ "message" :  {"data":{"messageType":"' + MT + '","notificationType":"StatusChange","workitem":{"id":"P2",'
    '"state":"Invited"}},"id":"e1"} ,"received_at":"2026-11-02T08:00:00+05:00","source":"odd"}',
    envelope("[1]", "s", at(3)),
    envelope('"text"', "s", at(3)),
    bayeux(data("Error", None, ref=77, code=409, message="locked"), mid="p3"),
    bayeux(data("StatusChange", "P1", state="Invited"), mid="p1"),  # duplicate of the padded one
    json.dumps({"received_at": "2026-11-02T08:00:00Z", "source": "s", "line": "hand-made line form"}),
    bare(data("StatusChange", "N1", user_data={"x": float("nan")})),
    STATUS_CHANGE + '{"id": "N5\\ud800"}}}',
]


def test_export_then_import_reproduces_log_and_projections(engine):
    feed(engine, list(simulate(300, agents=3, seed=5, noise_rate=0.05, duplicate_rate=0.05)), source="sim")
    feed(engine, ODD_LINES, source="odd-file")
    feed(engine, list(simulate(50, agents=2, seed=6, fmt="bayeux", duplicate_rate=0.2)), source="bay")
    runner.project(engine)
    with engine.connect() as conn:
        assert verify(conn).ok
        original = log_rows(conn)
        projections = projection_snapshot(conn)
        exported = "".join(line + "\n" for line in export_lines(conn))
    assert len(exported.splitlines()) == len(original) == 300 + len(ODD_LINES) + 50
    assert {r["quarantine_reason"] is not None for r in original} == {True, False}
    assert any(r["duplicate_of"] for r in original)

    with fresh_store(engine.dialect.name) as copy:
        result = import_stream(copy, io.BytesIO(exported.encode()), file_name="export.jsonl", source="restore")
        assert result.appended == len(original)
        runner.project(copy)
        with copy.connect() as conn:
            restored = log_rows(conn)
            for a, b in zip(original, restored, strict=True):
                assert a == b
            assert len(restored) == len(original)
            assert projection_snapshot(conn) == projections
            assert verify(conn).ok
            again = "".join(line + "\n" for line in export_lines(conn))
    assert again == exported


# -- the appenders' lock: a writer that waits too long gives up with one clear line ----------------

def test_a_writer_gives_up_on_a_held_lock_with_one_clear_line(engine):
    """Two connections: the first holds the appenders' lock; the second, asking for a short
    wait, gives up with StoreLocked after about that long, on both engines.  The wait it asked
    for does not stay with the connection (SQLite's busy_timeout, PostgreSQL's lock_timeout)."""
    feed(engine, list(simulate(5, agents=1)))
    with write_transaction(engine) as holder:
        lock_for_append(holder)
        assert log.head(holder)[0] == 5
        for attempt in (lambda: _append_lock(engine, 0.5), lambda: probe_writable(engine, 0.5)):
            start = time.monotonic()
            with pytest.raises(StoreLocked) as caught:
                attempt()
            assert 0.4 < time.monotonic() - start < 10
            message = str(caught.value)
            assert message.startswith("the store is locked by another writer for more than 0.5 s: ")
            assert "\n" not in message and "None" not in message
            assert isinstance(caught.value, StoreError)
    assert probe_writable(engine, 0.5) == 5  # released: the same writer goes through
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 60_000
        else:
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar_one() == "0"
    with write_transaction(engine) as conn:  # the default wait is the same on both engines
        setting = "PRAGMA busy_timeout" if engine.dialect.name == "sqlite" else "SHOW lock_timeout"
        assert conn.exec_driver_sql(setting).scalar_one() in (60_000, "1min")


def _append_lock(engine, timeout: float) -> None:
    with write_transaction(engine, timeout) as conn:
        lock_for_append(conn)


# -- opening a store: URLs, and readers that never create one -------------------------------------

@pytest.mark.parametrize(("given", "driver"), [
    ("postgres://u@h:5432/d", "postgresql+psycopg"),
    ("postgresql://u:secret@h/d", "postgresql+psycopg"),
    ("postgres+psycopg2://u@h/d", "postgresql+psycopg2"),
    ("postgresql+psycopg://u@h/d", "postgresql+psycopg"),
    ("sqlite:///x.db", "sqlite"),
])
def test_postgres_urls_are_postgresql_through_psycopg(given, driver):
    assert parse_url(given).drivername == driver


@pytest.mark.postgres
def test_a_postgres_url_opens_the_store(pg_url):
    url = "postgres://" + pg_url.split("://", 1)[1]
    engine = open_store(url)
    try:
        feed(engine, list(simulate(3, agents=1)))
    finally:
        engine.dispose()
    reader = open_reader(url)
    try:
        with reader.connect() as conn:
            assert log.head(conn)[0] == 3
    finally:
        reader.dispose()


def test_a_reader_never_creates_a_store(tmp_path):
    missing = tmp_path / "typo.db"
    with pytest.raises(StoreError) as caught:
        open_reader(str(missing))
    assert str(caught.value) == (f"no store at {missing} (create one with `workitem-store init --db {missing}` "
                                 "or `workitem-store import`)")
    assert not missing.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(StoreError) as caught:
        open_reader(f"sqlite:///{tmp_path}")
    assert str(caught.value) == (f"no store at {tmp_path} (it is a directory; create one with `workitem-store "
                                 f"init --db {tmp_path / 'workitems.db'}` or `workitem-store import`)")
    with pytest.raises(StoreError, match=r"is a directory, not a SQLite file \(give the store's file"):
        open_engine(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


# -- reading in bounded pieces: IN lists and keyset pages ------------------------------------------

def test_select_in_finds_every_key_across_in_lists(engine):
    feed(engine, list(simulate(2000, agents=3, seed=8)))
    c = event_log.c
    with engine.connect() as conn:
        everything = conn.execute(select(c.seq, c.source, c.message_id)).all()
        seqs = [seq for seq, _, _ in everything] + [10_000, 10_001]  # two that are not there
        found = sorted(seq for (seq,) in select_in(conn, select(c.seq), [c.seq], seqs))
        assert found == sorted(seq for seq, _, _ in everything) and len(found) > 1000
        pairs = {(source, mid) for _, source, mid in everything if mid is not None}
        assert len(pairs) > 1000  # several IN lists for one source
        rows = select_in(conn, select(c.source, c.message_id), [c.source, c.message_id], pairs)
        assert {tuple(row) for row in rows} == pairs


def test_pages_read_a_range_in_seq_order_in_bounded_pages(engine):
    feed(engine, list(simulate(1500, agents=3, seed=9)))
    c = event_log.c
    query = select(c.seq, c.source).where(c.seq % 3 != 0)  # rows filtered out within each page's range
    with engine.connect() as conn:
        for raw in (False, True):
            for after, upto, size in ((0, None, 256), (100, 1000, 256), (100, 1000, 900), (7, 8, 10), (5, 5, 10)):
                got = list(pages(conn, query, after, upto, size, raw=raw))
                assert all(0 < len(page) <= size for page in got)
                last = 1500 if upto is None else upto
                assert [row[0] for page in got for row in page] == [s for s in range(after + 1, last + 1) if s % 3]
                assert all(type(row[0]) is int and isinstance(row[1], str) for page in got for row in page)

