"""Erasure (issue 12): ``forget`` redacts userData values in the log, records each redaction, and
everything downstream forgets too; the triggers let nothing else change the log.  Both engines."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from helpers import at, bare, bayeux, data, envelope, live, load_store, run, snapshot, started
from sqlalchemy import inspect, select, text

from store import redaction
from store.db import open_store, text_sha256, write_transaction
from store.db import snapshot as snapshot_of
from store.errors import StoreError
from store.redaction import MARKER, Selection, forget, redact_payload
from store.schema import event_log, redactions, workitems
from store.verify import verify

SECRET = "C5947"


def _lines() -> list[str]:
    """w1 holds the secret (notifications, a duplicate, a quarantined copy, a snapshot); w2 not."""
    w1 = data(wid="w1", state="Invited", user_data={"Customer": SECRET, "Phone": "555-0100"})
    return [
        envelope(bayeux(w1, mid="1"), "agent-1", at(0)),
        envelope(bayeux(w1, mid="1"), "agent-1", at(1)),  # delivered again: a duplicate row
        envelope(bayeux(data(wid="w2", state="Invited", user_data={"Customer": "C1111", "Phone": "555-0200"}),
                        mid="2"), "agent-1", at(2)),
        envelope(bayeux(data("PropertiesUpdated", wid="w1", user_data={"Customer": SECRET, "Note": "call back"}),
                        mid="3"), "agent-1", at(3)),
        envelope(bayeux(data(wid="w1", state="Processing"), mid="4"), "agent-1", at(4)),
        envelope(bare(data(wid="w1", message_type="Other", user_data={"Customer": SECRET})), "agent-1", at(5)),
        started("agent-1", "s1", at(6)),
        snapshot("agent-1", "s1", at(7), [
            {"id": "w1", "state": "Processing", "userData": {"Customer": SECRET, "Tier": "gold"}},
            {"id": "w2", "state": "Invited", "userData": {"Customer": "C1111"}}]),
        live(data(wid="w2", state="Processing"), "agent-1", "s1", at(8)),
        envelope(bayeux(data(wid="w3", state="Invited", user_data="not an object"), mid="5"), "agent-1", at(9)),
    ]


@pytest.fixture
def store(db_url):
    load_store(db_url, _lines())
    return db_url


def _everything(url: str) -> str:
    """The text of every row of every table and view of the store."""
    engine = open_store(url)
    try:
        names = inspect(engine).get_table_names() + inspect(engine).get_view_names()
        with engine.connect() as conn:
            return "\n".join(repr(tuple(row)) for name in names for row in conn.execute(text(f"SELECT * FROM {name}")))
    finally:
        engine.dispose()


def _state(url: str) -> tuple:
    engine = open_store(url)
    try:
        with engine.connect() as conn:
            return tuple(conn.execute(select(t).order_by(*t.primary_key.columns)).all()
                         for t in (event_log, redactions, workitems))
    finally:
        engine.dispose()


def test_forget_a_customer_leaves_no_trace_and_the_store_verifies(store):
    assert SECRET in _everything(store)
    result = run("forget", "--user-data", f"Customer={SECRET}", "--reason", "erasure request 117", "--db", store)
    # rows 1, 2 (duplicate), 4, 6 (quarantined) and the snapshot (8)
    assert result.output.startswith("forget: 5 rows redacted, 0 already redacted; 1 workitems refreshed: w1\n")
    assert SECRET not in _everything(store)
    export = run("export", "--db", store).output
    assert SECRET not in export and MARKER in export
    history = run("history", "w1", "--db", store).output
    assert SECRET not in history and MARKER in history
    state = run("state", "w1", "--as-of", "2026-11-02T08:00:05Z", "--json", "--db", store).output
    assert SECRET not in state and MARKER in state
    verified = run("verify", "--db", store, ok=None)
    assert verified.exit_code == 0, verified.output
    engine = open_store(store)
    with snapshot_of(engine) as conn:
        assert verify(conn).redacted == 5
    with engine.connect() as conn:
        records = conn.execute(select(redactions).order_by(redactions.c.id)).all()
        rows = {r.seq: r for r in conn.execute(select(event_log))}
        user_data = dict(conn.execute(select(workitems.c.workitem_id, workitems.c.user_data)).all())
    engine.dispose()
    assert [r.seq for r in records] == [1, 2, 4, 6, 8]
    for record in records:
        row = rows[record.seq]
        assert record.payload_sha256 == text_sha256(row.payload) != row.payload_sha256  # hash: the original
        assert record.reason == "erasure request 117" and record.redacted_by
    assert json.loads(records[0].keys) == ["Customer", "Phone"]
    assert [json.loads(r.workitems) for r in records] == [["w1"]] * 5
    assert json.loads(rows[1].payload)["data"]["workitem"]["userData"] == {"Customer": MARKER, "Phone": MARKER}
    assert json.loads(rows[3].payload)["data"]["workitem"]["userData"]["Customer"] == "C1111"  # w2's own rows: kept
    # The snapshot lists w2 too: only w1's userData in it is redacted, w2's (another customer) is kept.
    snapshot_body = json.loads(rows[8].payload)
    assert [w["userData"] for w in snapshot_body["workitems"]] == [{"Customer": MARKER, "Tier": MARKER},
                                                                   {"Customer": "C1111"}]
    assert user_data == {"w1": {"Customer": MARKER, "Tier": MARKER}, "w2": {"Customer": "C1111"},
                         "w3": "not an object"}


def test_forget_twice_changes_nothing(store):
    run("forget", "--user-data", f"Customer={SECRET}", "--reason", "r", "--db", store)
    before = _state(store)
    again = run("forget", "--workitem", "w1", "--reason", "r", "--json", "--db", store).output
    assert json.loads(again) | {"already_redacted": 0} == {
        "dry_run": False, "redacted": 0, "would_redact": None, "already_redacted": 0,
        "workitems_refreshed": [], "wal_cleared": None, "rows": None}
    assert json.loads(again)["already_redacted"] == 5  # w1's rows and the snapshot: nothing left to redact
    assert _state(store) == before


def test_dry_run_lists_and_changes_nothing(store):
    before = _state(store)
    result = run("forget", "--workitem", "w2", "--keys", "Phone,Nope", "--reason", "r", "--dry-run", "--db", store)
    assert _state(store) == before
    lines = result.output.splitlines()
    assert lines[-1] == "dry run: 1 rows would be redacted, 0 already are; nothing changed"
    assert any(line.split() == ["3", "notification", "w2", "Phone"] for line in lines)


def test_keys_workitems_and_received_before_combine(store):
    result = run("forget", "--workitem", "w1", "--received-before", "2026-11-02T08:00:03.5Z", "--keys", "Phone,Note",
                 "--reason", "r", "--json", "--db", store)
    assert json.loads(result.output)["redacted"] == 3  # rows 1, 2 (Phone) and 4 (Note); not the snapshot (later)
    engine = open_store(store)
    with engine.connect() as conn:
        payloads = dict(conn.execute(select(event_log.c.seq, event_log.c.payload)).all())
        user_data = conn.execute(select(workitems.c.user_data).where(workitems.c.workitem_id == "w1")).scalar_one()
    engine.dispose()
    assert json.loads(payloads[1])["data"]["workitem"]["userData"] == {"Customer": SECRET, "Phone": MARKER}
    assert json.loads(payloads[4])["data"]["workitem"]["userData"] == {"Customer": SECRET, "Note": MARKER}
    assert user_data == {"Customer": SECRET, "Tier": "gold"}  # from the snapshot, not redacted
    # A duration: everything is older than 1 minute.
    everything = run("forget", "--received-before", "1m", "--reason", "retention", "--json", "--db", store)
    assert json.loads(everything.output)["redacted"] == 6
    assert SECRET not in _everything(store) and "C1111" not in _everything(store)
    assert run("verify", "--db", store, ok=None).exit_code == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--reason", "r"], "forget needs a selection"),
    (["--workitem", "w1"], "Missing option '--reason'"),
    (["--user-data", "Customer", "--reason", "r"], "is not KEY=VALUE"),
    (["--received-before", "90", "--reason", "r"], "give a unit"),
    (["--received-before", "yesterday", "--reason", "r"], "is not a timestamp"),
])
def test_usage_errors(args, message, tmp_path):
    result = run("forget", *args, "--db", tmp_path / "none.db", ok=False)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "none.db").exists()


def _update(url: str, sql: str, **params) -> None:
    engine = open_store(url)
    try:
        with write_transaction(engine) as conn:
            conn.execute(text(sql), params)
    finally:
        engine.dispose()


def _record(url: str, seq: int, payload: str) -> None:
    engine = open_store(url)
    try:
        with write_transaction(engine) as conn:
            redaction.record(conn, [{"seq": seq, "redacted_at": dt.datetime.now(dt.UTC), "reason": "test",
                                     "keys": ["Customer"], "workitems": ["w1"],
                                     "payload_sha256": text_sha256(payload),
                                     "redacted_by": redaction.database_user(conn)}])
    finally:
        engine.dispose()


def test_the_triggers_refuse_every_other_change(store):
    engine = open_store(store)
    with engine.connect() as conn:
        payload = conn.execute(select(event_log.c.payload).where(event_log.c.seq == 1)).scalar_one()
    engine.dispose()
    new, keys, workitems = redact_payload(payload, "notification", ["Customer"])
    assert (keys, workitems) == (["Customer"], ["w1"])
    refused = [
        ("UPDATE event_log SET payload = :p WHERE seq = 1", {"p": new}),  # no record yet
        ("UPDATE event_log SET source = 'x' WHERE seq = 1", {}),
        ("DELETE FROM event_log WHERE seq = 1", {}),
    ]
    for sql, params in refused:
        with pytest.raises(StoreError, match="append-only"):
            _update(store, sql, **params)
    _record(store, 1, new)
    for sql, params in [
        ("UPDATE event_log SET payload = :p, quarantine_reason = 'x' WHERE seq = 1", {"p": new}),  # another column
        ("UPDATE event_log SET payload = :p WHERE seq = 1", {"p": new + " "}),  # not the recorded text
        ("UPDATE event_log SET payload = :p WHERE seq = 3", {"p": new}),  # the record is of another seq
        ("DELETE FROM redactions", {}),
        ("UPDATE redactions SET reason = 'x'", {}),
    ]:
        with pytest.raises(StoreError, match="append-only"):
            _update(store, sql, **params)
    _update(store, "UPDATE event_log SET payload = :p WHERE seq = 1", p=new)  # the recorded redaction passes
    _record(store, 1, payload)  # an older text recorded again: the newest record decides
    _update(store, "UPDATE event_log SET payload = :p WHERE seq = 1", p=payload)
    with pytest.raises(StoreError, match="append-only"):
        _update(store, "UPDATE event_log SET payload = :p WHERE seq = 1", p=new)


def test_a_client_without_the_function_cannot_redact(tmp_path):
    """SQLite: wis_sha256 exists only on the store's own connections."""
    import sqlite3

    path = tmp_path / "store.db"
    load_store(f"sqlite:///{path}", _lines())
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.OperationalError, match="wis_sha256"):
            conn.execute("UPDATE event_log SET payload = payload || ' ' WHERE seq = 1")
    finally:
        conn.close()


class Interrupted(Exception):
    pass


def test_an_interrupted_forget_leaves_whole_rows_and_the_next_run_finishes(store):
    engine = open_store(store)
    calls = []

    def stop_after_two(result):
        calls.append(result.redacted)
        if len(calls) == 2:
            raise Interrupted

    selection = Selection(user_data=("Customer", SECRET))
    with pytest.raises(Interrupted):
        forget(engine, selection, "erasure", chunk=1, after_chunk=stop_after_two)
    assert calls == [1, 2]
    with engine.connect() as conn:
        rows = conn.execute(select(event_log).order_by(event_log.c.seq)).all()
        records = conn.execute(select(redactions)).all()
    assert sorted(r.seq for r in records) == [1, 2]
    newest = {r.seq: r.payload_sha256 for r in sorted(records, key=lambda r: r.id)}
    for row in rows:
        if row.seq in newest:
            assert newest[row.seq] == text_sha256(row.payload) and SECRET not in row.payload
        else:
            assert text_sha256(row.payload) == row.payload_sha256  # untouched
    assert run("verify", "--db", store, ok=None).exit_code == 0  # w1's user_data still from the snapshot
    result = forget(engine, selection, "erasure", chunk=1)
    engine.dispose()
    assert (result.redacted, result.already) == (3, 0)
    assert SECRET not in _everything(store)
    assert run("verify", "--db", store, ok=None).exit_code == 0


def test_seals_still_verify_after_forget(store, tmp_path):
    run("keygen", tmp_path / "k")
    witness = tmp_path / "w.jsonl"
    run("seal", "--key", tmp_path / "k", "--witness", witness, "--db", store)
    run("forget", "--user-data", f"Customer={SECRET}", "--reason", "r", "--db", store)
    result = run("verify", "--db", store, "--witness", witness, "--public-key", tmp_path / "k.pub", ok=None)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("seals ok: 1 seals, signatures checked")


# -- redact_payload ---------------------------------------------------------------------------------

def test_redact_payload_shapes():
    message = bayeux(data(wid="w1", user_data={"b": 1, "a": {"x": [1]}, "é": "ü"}), mid="7")
    new, keys, workitems = redact_payload(message, "notification", None)
    assert (keys, workitems) == (["a", "b", "é"], ["w1"])
    assert new == ('{"channel":"/v2/me/workitems","id":"7","data":{"messageType":"WorkitemStateChangeMessage",'
                   '"notificationType":"StatusChange","workitem":{"id":"w1","userData":'
                   '{"b":"[REDACTED]","a":"[REDACTED]","é":"[REDACTED]"}}}}')
    assert redact_payload(new, "notification", None) is None  # already redacted
    assert redact_payload(bare(data(user_data={"a": 1})), "notification", ["b"]) is None  # no such key
    assert redact_payload(bare(data(user_data="text")), "notification", None) is None  # not an object
    assert redact_payload("not JSON", "notification", None) is None
    assert redact_payload(bare(data(user_data={"a": 1})), "session", None) is None
    body = json.dumps({"statusCode": 0, "workitems": [{"id": "a", "userData": {"k": 1}}, {"id": "b"},
                                                      {"id": "c", "userData": {"k": 2, "j": 3}}]})
    new, keys, workitems = redact_payload(body, "snapshot", ["k"])
    assert (keys, workitems) == (["k"], ["a", "c"])
    assert [w.get("userData") for w in json.loads(new)["workitems"]] == [
        {"k": MARKER}, None, {"k": MARKER, "j": 3}]
    # Only the userData of the workitems asked for: the others in the snapshot are kept.
    new, keys, workitems = redact_payload(body, "snapshot", None, workitems={"c"})
    assert (keys, workitems) == (["j", "k"], ["c"])
    assert [w.get("userData") for w in json.loads(new)["workitems"]] == [{"k": 1}, None, {"k": MARKER, "j": MARKER}]
    # Numbers beyond 64 bits elsewhere in the payload are kept exactly.
    big = '{"data":{"n":123456789012345678901234567890,"workitem":{"id":"w","userData":{"k":"v"}}}}'
    assert redact_payload(big, "notification", None)[0] == big.replace('"v"', '"[REDACTED]"')


def test_on_sqlite_the_clear_values_leave_the_files_too(tmp_path):
    """The database file and its WAL hold no byte of a forgotten value after `forget` (the space
    of the old values zeroed, the WAL checkpointed and emptied), not only its tables."""
    path = tmp_path / "store.db"
    load_store(f"sqlite:///{path}", _lines())
    files = [path, path.with_name("store.db-wal")]
    assert any(SECRET.encode() in f.read_bytes() for f in files if f.exists())
    out = run("forget", "--user-data", f"Customer={SECRET}", "--reason", "erasure", "--json", "--db", path).output
    assert json.loads(out)["wal_cleared"] is True
    assert not any(SECRET.encode() in f.read_bytes() for f in files if f.exists())


def test_a_reader_that_keeps_the_wal_is_reported(tmp_path):
    """A reader in a transaction stops the WAL from being emptied: forget says so (the WAL may
    still hold pages written before), and exits 0: the tables hold no clear value."""
    import sqlite3

    path = tmp_path / "store.db"
    load_store(f"sqlite:///{path}", _lines())
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM event_log").fetchone()
        out = run("forget", "--user-data", f"Customer={SECRET}", "--reason", "erasure", "--db", path).output
    finally:
        reader.close()
    assert out.startswith("forget: 5 rows redacted")
    assert "note: a reader kept the SQLite WAL" in out
