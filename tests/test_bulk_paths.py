"""The bulk paths of issue 9 give exactly what the general paths give.

* PostgreSQL writes new rows with COPY (``bulk.insert_rows``): the same values as INSERT, for odd
  text, JSON and timestamps, and the same log and projections as a SQLite store.
* Each engine finds duplicates with one index probe per key (``duplicates.first_copies``,
  ``duplicates.copies_by_payload``): the same rows on both engines, and the same duplicate rules
  (within a batch, across batches, with and without ids).
* An envelope line as export writes it is read with one parse (``notifications._exported_envelope``):
  every line, however odd, classifies as it does without that shortcut.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from unittest import mock

import pytest
from fuzz_inputs import categories
from helpers import (
    at,
    bare,
    bayeux,
    canonical,
    data,
    fresh_store,
    live,
    log_rows,
    projection_snapshot,
    started,
    table_rows,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import BigInteger, Boolean, Column, Integer, MetaData, Table, Text, text
from sqlalchemy.exc import IntegrityError

from store import duplicates, log, notifications
from store.bulk import insert_rows
from store.db import open_engine, write_transaction
from store.errors import StoreError
from store.export import export_lines
from store.ingest.files import import_stream
from store.notifications import MAX_TIME, MIN_TIME, parse_line
from store.projections import runner
from store.schema import JSONValue, UTCDateTime
from store.simulate import simulate

UTC = dt.UTC

# -- COPY writes what INSERT writes --------------------------------------------------------------

TEXTS = ["plain", "", None, "tab\there", "new\nline", "carriage\rreturn", "back\\slash", "\\N", "\\.", "end\\",
         "\\t not a tab", "unicode é ü 😀 中文", "quotes ' \" `", "\u2028\u2029", "control \x01\x1f\x7f",
         " spaces around ", "comma, semicolon; pipe |"]
JSONS = [{"k": "v\\"}, {"nested": [1, 2.5, None, True, False, {"x": "tab\t new\n cr\r"}]}, 2**70, -(2**70),
         "a string", "", [], {}, None, 1e300, 5e-324, -0.0, 0.1, 12345678901234567890,
         {"emoji": "😀", "accent": "é", "escape": "\\u00e9", "nul-looking": "\\u0000"},
         {"\\N": "\\.", "quote\"key": "'"}, [[[["deep"]]]], {"b": 1, "a": 2}, True, 0]
TIMES = [dt.datetime(2026, 11, 2, 8, 0, 0, 1, tzinfo=UTC), dt.datetime(2026, 11, 2, 8, 0, 0, 999999, tzinfo=UTC),
         MIN_TIME, MAX_TIME, dt.datetime(2026, 3, 29, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
         dt.datetime(2026, 11, 2, 8, 0, tzinfo=dt.timezone(-dt.timedelta(hours=11))), None]
BOOLS = [True, False, None]
BIGS = [2**63 - 1, -(2**63), 0, -1, None]
INTS = [2**31 - 1, -(2**31), 7, None]


def _odd_table(metadata: MetaData, name: str) -> Table:
    return Table(name, metadata, Column("id", BigInteger, primary_key=True, autoincrement=False),
                 Column("t", Text), Column("j", JSONValue), Column("at", UTCDateTime), Column("b", Boolean),
                 Column("n", BigInteger), Column("i", Integer))


def _odd_rows() -> list[dict]:
    count = 3 * max(map(len, (TEXTS, JSONS, TIMES)))
    return [{"id": k, "t": TEXTS[k % len(TEXTS)], "j": JSONS[k % len(JSONS)], "at": TIMES[k % len(TIMES)],
             "b": BOOLS[k % len(BOOLS)], "n": BIGS[k % len(BIGS)], "i": INTS[k % len(INTS)]}
            for k in range(count)]


@pytest.mark.postgres
def test_copy_writes_the_values_insert_writes(pg_url):
    engine = open_engine(pg_url)
    metadata = MetaData()
    copied, inserted = _odd_table(metadata, "bulk_copied"), _odd_table(metadata, "bulk_inserted")
    metadata.create_all(engine)
    rows = _odd_rows()
    try:
        with engine.begin() as conn:
            insert_rows(conn, copied, rows)  # COPY
            conn.execute(inserted.insert(), rows)  # SQLAlchemy's own INSERT
        with engine.connect() as conn:
            by_copy, by_insert = table_rows(conn, copied), table_rows(conn, inserted)
            # The database's own text of each value (jsonb's normal form, timestamptz in UTC).
            conn.execute(text("SET TIME ZONE 'UTC'"))
            as_text = "SELECT id, t, j::text, at::text, b::text, n::text, i::text FROM {} ORDER BY id"
            texts_copied = conn.execute(text(as_text.format("bulk_copied"))).all()
            texts_inserted = conn.execute(text(as_text.format("bulk_inserted"))).all()
    finally:
        engine.dispose()
    assert by_copy == by_insert
    assert texts_copied == texts_inserted
    for row, back in zip(rows, by_copy, strict=True):  # and what comes back is what went in
        assert {**back, "j": None} == {**row, "j": None, "at": row["at"] and row["at"].astimezone(UTC)}, row
        assert _same_json(back["j"], row["j"]), row


def _same_json(a, b) -> bool:
    """Equal JSON values, numbers compared as jsonb keeps them (1e300 reads back as an integer)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same_json, a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) | isinstance(b, bool):
        return float(a) == float(b)
    return type(a) is type(b) and a == b


@pytest.mark.postgres
def test_a_failing_copy_is_a_database_error(pg_url):
    """As a failing INSERT: SQLAlchemy's DBAPIError (IntegrityError here), which write_transaction
    reports as a StoreError, and nothing of the transaction is kept."""
    engine = open_engine(pg_url)
    metadata = MetaData()
    table = _odd_table(metadata, "bulk_copied")
    metadata.create_all(engine)
    rows = _odd_rows()[:5]
    try:
        with engine.connect() as conn:
            insert_rows(conn, table, rows)  # outside a transaction: begins one, as execute() does
            conn.commit()
        with engine.connect() as conn, pytest.raises(IntegrityError):
            insert_rows(conn, table, rows[-1:])
        with pytest.raises(StoreError, match="duplicate key"), write_transaction(engine) as conn:
            insert_rows(conn, table, [{**rows[0], "id": 100}])
            insert_rows(conn, table, rows[:1])
        with engine.connect() as conn:
            assert [r["id"] for r in table_rows(conn, table)] == [r["id"] for r in rows]
    finally:
        engine.dispose()


def _odd_log_lines() -> list[str]:
    """An export (envelope lines only: no row takes the time of reading) of a log holding every
    hostile category of issue 8, a simulated stream with duplicates, and live rows of two sessions."""
    hostile = [raw for category in categories(1).values() for raw in category]
    wid = "W-odd"
    sessions = [started("agent", "agent/1", at(0)), started("agent", "agent/2", at(1))]
    live_rows = [live(data("StatusChange", wid, state="Invited", caps=["Accept"]), "agent", s, at(10 + i))
                 for i, s in enumerate(["agent/1", "agent/2", "agent/1"])]
    raw = b"".join(line + b"\n" for line in hostile)
    raw += "".join(line + "\n" for line in [*simulate(1500, agents=4, seed=3), *sessions, *live_rows]).encode()
    with fresh_store("sqlite") as engine:
        import_stream(engine, io.BytesIO(raw), file_name="odd.jsonl", source="odd")
        with engine.connect() as conn:
            return list(export_lines(conn))


@pytest.mark.postgres
def test_the_same_export_gives_the_same_rows_on_both_engines(pg_admin):
    """COPY (PostgreSQL) and INSERT (SQLite) store the same log, chain hashes included, and
    the projections computed from it (jsonb columns written by COPY on a rebuild) agree."""
    lines = _odd_log_lines()
    raw = "".join(line + "\n" for line in lines).encode()
    stores = {}
    for kind in ("sqlite", "postgresql"):
        with fresh_store(kind) as engine:
            # Twice: the second time, every duplicate is found in the log, not in the batch.
            import_stream(engine, io.BytesIO(raw), file_name="one.jsonl", source="restore")
            import_stream(engine, io.BytesIO(raw), file_name="two.jsonl", source="restore")
            runner.project(engine)
            with engine.connect() as conn:
                stores[kind] = (log_rows(conn), {name: canonical([{k: _numbers_as_floats(v) for k, v in row.items()}
                                                                  for row in rows])
                                                 for name, rows in projection_snapshot(conn).items()})
    (sqlite_log, sqlite_projections), (pg_log, pg_projections) = stores["sqlite"], stores["postgresql"]
    assert len(pg_log) == 2 * len(lines) and sum(r["duplicate_of"] is not None for r in pg_log) > len(lines) // 2
    assert pg_log == sqlite_log
    assert pg_projections == sqlite_projections


def _numbers_as_floats(value):
    """JSON numbers as floats: jsonb keeps 1e300 as a numeric that reads back as an integer, and
    -0.0 as 0 (by INSERT as by COPY: test_copy_writes_the_values_insert_writes), SQLite's JSON
    text as floats."""
    if isinstance(value, dict):
        return {k: _numbers_as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_as_floats(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) + 0.0  # (numeric has no -0: jsonb reads -0.0 back as 0)
    return value


# -- the duplicate rules, probed key by key -------------------------------------------------------

def _scenario() -> list[list[str]]:
    """Batches (appended one by one) exercising every duplicate rule (docs/RULES.md section 3)."""
    a, b = data("StatusChange", "w1", state="Invited"), data("StatusChange", "w1", state="Processing")
    c = data("PropertiesUpdated", "w2", user_data={"k": "v"})
    first = [
        bayeux(a, "1"), bayeux(a, "1"),  # 3.1 within the batch
        bayeux(b, "1"),  # the same id, another text: not a duplicate
        bayeux(a, "2"), bare(c), bare(c),  # no id and no envelope: never duplicates
        started("agent", "agent/1", at(0)), started("agent", "agent/2", at(1)),
        live(a, "agent", "agent/1", at(5)), live(a, "agent", "agent/2", at(6)),  # 3.3: two sessions
        live(b, "agent", "agent/1", at(7)), live(b, "agent", "agent/1", at(7)),  # 3.2: the same record
        live(c, "agent", "agent/2", at(200)),
        live(c, "other", "other/1", at(5)),  # another source
    ]
    second = [
        bayeux(a, "1"), bayeux(b, "1"), bayeux(a, "3"),  # 3.1 across batches
        live(b, "agent", "agent/1", at(7)), live(a, "agent", "agent/2", at(6)),  # 3.2 across batches
        live(c, "agent", "agent/1", at(230)),  # 3.3 across batches (within the window)
        live(a, "agent", "agent/1", at(400)),  # outside the window: a new notification
        bare(c),
    ]
    third = first + second  # everything again: all of it duplicates what is logged
    return [first, second, third]


def _append_scenario(engine) -> list[tuple]:
    context = log.AppendContext()
    for i, batch in enumerate(_scenario()):
        with write_transaction(engine) as conn:
            log.append(conn, [parse_line(line) for line in batch], source="file", received_at=at(1000 + i),
                       context=context)
    with engine.connect() as conn:
        return [(r["seq"], r["duplicate_of"], r["chain_hash"], r["quarantine_reason"]) for r in log_rows(conn)]


@pytest.mark.postgres
def test_the_duplicate_rules_give_the_same_rows_on_both_engines(pg_admin):
    with fresh_store("sqlite") as engine:
        on_sqlite = _append_scenario(engine)
    with fresh_store("postgresql") as engine:
        on_postgresql = _append_scenario(engine)
    assert on_postgresql == on_sqlite
    duplicate_of = {seq: of for seq, of, _, reason in on_sqlite if reason is None}
    # The first batch: 3.1 within it, 3.3 between sessions, 3.2 the same record.
    assert [duplicate_of[s] for s in range(1, 15) if s not in (7, 8)] == [
        None, 1, None, None, None, None, None, 9, None, 11, None, None]
    # The second: 3.1, 3.2 and 3.3 against the first batch; not a copy of a duplicate (10), nor
    # beyond the window, nor bare.
    assert [duplicate_of[s] for s in range(15, 23)] == [1, 3, None, 11, None, 13, None, None]
    # The third: the first two again, each row a duplicate of the row it copies (or its first copy)
    # but for the rows that never are (bare lines, markers).
    assert sum(of is not None for seq, of in duplicate_of.items() if seq > 22) == 16


@pytest.mark.postgres
def test_duplicate_lookups_find_the_same_rows_on_both_engines(pg_admin):
    """The same log on each engine: each engine's lookup (a JSON array of keys, joined LATERAL on
    PostgreSQL, in an IN subquery on SQLite) finds the same first copies and the same copies by
    payload, odd keys and absent ones included."""
    lines = [*simulate(1200, agents=3, seed=5), *simulate(300, agents=3, seed=6, fmt="bare")]
    found = []
    for kind in ("sqlite", "postgresql"):
        with fresh_store(kind) as engine:
            for name in ("one", "two"):
                import_stream(engine, io.BytesIO("".join(line + "\n" for line in lines).encode()), file_name=name,
                              source="src")
            with engine.connect() as conn:
                rows = log_rows(conn)
                keys = {(r["source"], r["message_id"]) for r in rows if r["message_id"] is not None}
                keys |= {("src", "absent"), ("nobody", "1"), ("src", "quote'\"\\ é")}
                digests = {r["payload_sha256"] for r in rows} | {"0" * 64}
                first, copies = duplicates.first_copies(conn, keys), duplicates.copies_by_payload(conn, digests)
            # (Lines without an envelope get the time they were read: not the same on both engines.)
            at = {r["seq"]: r["received_at"] for r in rows}
            assert all(c.received_at == at[c.seq] and c.received_at.tzinfo is UTC
                       for same in copies.values() for c in same)
            found.append((first, {key: [(c.seq, c.session, c.duplicate_of) for c in same]
                                  for key, same in copies.items()}))
    (first_sqlite, payload_sqlite), (first_pg, payload_pg) = found
    assert first_sqlite == first_pg and len(first_pg) > 1000
    assert payload_sqlite == payload_pg and sum(map(len, payload_pg.values())) >= 600


# -- one parse for an exported envelope -----------------------------------------------------------

def _without_shortcut(line: str):
    with mock.patch.object(notifications, "_exported_envelope", lambda _line: None):
        return parse_line(line)


MESSAGE = '{"channel": "/v2/me/workitems", "id": "7", "data": {"messageType": "WorkitemStateChangeMessage", ' \
          '"notificationType": "StatusChange", "workitem": {"id": "w1", "state": "Invited"}}}'
HEAD = '{"received_at": "2026-11-02T08:00:00.000001Z", "source": "agent", '
ODD_ENVELOPES = [
    HEAD + f'"message": {MESSAGE}}}',
    HEAD + f'"session": "agent/1", "message": {MESSAGE}}}',
    HEAD + f'"message":   {MESSAGE} \t }} \r',  # whitespace around the message and after the line
    HEAD + f'"message": {MESSAGE}, "message": {{"data": {{}}}}}}',  # a second "message" wins
    HEAD + f'"message": {{"data": {{}}}}, "message": {MESSAGE}}}',
    HEAD + f'"message": {MESSAGE}, "kind": "session"}}',
    HEAD + f'"message": {MESSAGE}}}}}',  # extra data
    HEAD + f'"message": {MESSAGE}',  # unclosed
    HEAD + '"message": }',
    HEAD + '"message": 5}', HEAD + '"message": "text"}', HEAD + '"message": null}', HEAD + '"message": []}',
    HEAD + '"message": {"data": {"x": "}"}}}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "a\\"message\\": {}, ", "message": ' + MESSAGE + '}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "x\\"", "message": ' + MESSAGE + '}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "\\u00e9\\t\\\\", "message": ' + MESSAGE + '}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "\\ud800", "message": ' + MESSAGE + '}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "tab\there", "message": ' + MESSAGE + '}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "bad \\q escape", "message": ' + MESSAGE + '}',
    '{"received_at": "2026-11-02T08:00:00\\u005a", "source": "s", "message": ' + MESSAGE + '}',
    '{"received_at": "yesterday", "source": "s", "message": ' + MESSAGE + '}',
    '{"received_at": "0001-01-01T00:00:00Z", "source": "s", "message": ' + MESSAGE + '}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "", "message": ' + MESSAGE + '}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "s", "session": "", "message": ' + MESSAGE + '}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "s", "session": null, "message": ' + MESSAGE + '}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "' + "s" * 600 + '", "message": ' + MESSAGE + '}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "s", "message": {"data": {"id": "\\u0000"}}}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "s", "message": {"id": 123456789012345678901234}}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "s", "message": {"x": 1e400}}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "s", "message": {"x": NaN}}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "s", "message": ' + "[" * 128 + "]" * 128 + "}",
    '{"received_at": "2026-11-02T08:00:00Z", "source": "s", "message": ' + "[" * 129 + "]" * 129 + "}",
    '{"received_at": "2026-11-02T08:00:00Z", "source": "s", "x": 1, "message": ' + MESSAGE + '}',
    '{"received_at":"2026-11-02T08:00:00Z","source":"s","message":' + MESSAGE + '}',
    ' {"received_at": "2026-11-02T08:00:00Z", "source": "s", "message": ' + MESSAGE + '}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "s", "line": "{}", "message": ' + MESSAGE + '}',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "s", "message": ' + MESSAGE + ', "line": "x"}',
]


@pytest.mark.parametrize("line", ODD_ENVELOPES)
def test_an_odd_envelope_classifies_as_without_the_shortcut(line):
    assert parse_line(line) == _without_shortcut(line)


def test_the_shortcut_takes_exports():
    exported = HEAD + f'"session": "agent/1", "message": {MESSAGE}}}'
    shortcut = notifications._exported_envelope(exported)
    assert shortcut is not None and shortcut == parse_line(exported) == _without_shortcut(exported)
    assert shortcut.payload == MESSAGE and shortcut.session == "agent/1" and shortcut.message_id == "7"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
_PIECES = st.sampled_from(['"message": ', '"message":', ', ', ',', '"source": ', '"session": ', '"kind": "session"',
                           '}', '{', '"', '\\', ' ', '\t', '\r', '"line": "x"', '"received_at": ', '\\u0000',
                           '\\ud800', '12345678901234567890123'])


@st.composite
def envelope_lines(draw) -> str:
    """Lines near export's envelope form: its pieces, varied, and sometimes broken."""
    def string() -> str:
        value = draw(st.text(max_size=10) | st.sampled_from(["", "agent-1", 'a"message": {', "\\", "é"]))
        return json.dumps(value, ensure_ascii=draw(st.booleans()))

    received_at = draw(st.sampled_from(['"2026-11-02T08:00:00.000001Z"', '"2026-11-02T09:00:00+01:00"', '""',
                                        '"x"', "5", "null", '"0001-01-01T00:00:00+01:00"']))
    message = draw(st.builds(lambda d, mid: json.dumps({"channel": "/c", "id": mid, "data": d},
                                                       ensure_ascii=False),
                             st.builds(data, st.sampled_from(["StatusChange", "Error", "x"]),
                                       st.sampled_from(["w1", None, "é"])),
                             st.sampled_from(["1", None, 5]))
                   | _JSON.map(json.dumps))
    head = f'{{"received_at": {received_at}, "source": {string()}, '
    if draw(st.booleans()):
        head += f'"session": {draw(st.sampled_from([string(), "null", "7"]))}, '
    line = head + f'"message": {message}}}'
    for _ in range(draw(st.integers(0, 2))):  # break it a little
        where = draw(st.integers(0, len(line)))
        if draw(st.booleans()):
            line = line[:where] + draw(_PIECES) + line[where:]
        else:
            line = line[:where] + line[where + draw(st.integers(1, 3)):]
    return line


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelope_lines())
def test_envelope_lines_classify_as_without_the_shortcut(line):
    assert parse_line(line) == _without_shortcut(line)
