"""Audit investigations and analysts' access, on both engines.

* ``history WORKITEM_ID``: the full trail of one workitem from the log (JSON, CSV, table);
* ``state WORKITEM_ID --as-of T | --seq N`` and ``audit.state``: equal to the projection computed
  from the log cut at that point (property tests);
* the views workitem_state_durations, request_outcome_summary, capability_timeline: the same
  rows on SQLite and PostgreSQL, and their exact semantics;
* read-only access: ``query`` cannot write, ``grant-readonly`` roles can only SELECT;
* ``status`` shows the same chain head that ``verify`` reaches.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import re
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import UTC, at, bare, bayeux, data, envelope, feed, fresh_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from store import audit, db
from store.cli import main
from store.db import open_store
from store.ingest.files import import_lines
from store.notifications import as_text, load_json
from store.projections import runner
from store.schema import VIEWS, event_log, workitems
from store.simulate import simulate

WORKITEM_COLUMNS = [c.name for c in workitems.columns]
ENTRY_KEYS = ["seq", "received_at", "source", "notification_type", "reference_id", "status", "state_from",
              "state_to", "capabilities_granted", "capabilities_revoked", "user_data_changes",
              "request_outcome", "error_code", "error_message"]


def run(*args, env=None, ok: bool | None = True):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
    if ok is not None:
        assert (result.exit_code == 0) == ok, (args, result.exit_code, result.output)
    return result


def kind_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def row_count(url: str, table: str) -> int:
    engine = open_store(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
    finally:
        engine.dispose()


def load_store(url: str, lines, *, project: bool = True, source: str = "agent-1") -> None:
    engine = open_store(url)
    try:
        feed(engine, lines, source=source)
        if project:
            runner.project(engine)
    finally:
        engine.dispose()


# -- a hand-made trail ------------------------------------------------------------------------

def t(i: int) -> dt.datetime:
    """received_at of the i-th line (seq i + 1) of TRAIL_LINES."""
    return at(i) + dt.timedelta(microseconds=250_001)


def env(message: str, i: int, source: str = "agent-1") -> str:
    return envelope(message, source, t(i))


M1 = bayeux(data("StatusChange", "W1", state="Invited", caps=["Accept", "Reject"], user_data={"Subject": "Refund"},
                 ref=1), "m1")
TRAIL_LINES = [
    env(M1, 0),                                                                                   # 1
    env(bayeux(data("StatusChange", "W2", state="Invited", caps=["Accept"], ref=2), "m2"), 1),     # 2 another workitem
    env(M1, 2),                                                                                   # 3 duplicate of 1
    env(bayeux(data("StatusChange", "W1", state="Processing", caps=["Transfer", "Complete"], ref=3), "m3"), 3),  # 4
    env(bayeux(data("PropertiesUpdated", "W1", user_data={"Subject": "Refund", "Note": "n1"}, ref=4), "m4"), 4),  # 5
    env(bayeux(data("Error", None, ref=4, code=500, message="timeout"), "m5"), 5),                # 6 only W1's referenceId
    env(bayeux(data("Error", None, ref=4, code=403), "x1"), 6, "agent-2"),                       # 7 same id, other session
    env(bare(data("Deleted", "W1", state="Gone")), 7),                                            # 8 quarantined
    env(bayeux(data("Error", "W1", ref=5, code=409, message="locked"), "m6"), 8),                 # 9
    env(bayeux(data("PropertiesUpdated", "W1", caps=["Complete"], user_data={"Note": "n2", "Queue": "q"},
                    ref=6), "m7"), 9),                                                            # 10
    env(bayeux(data("StatusChange", "W1", state="Completed", caps=[], ref=7), "m8"), 10),         # 11
    env(bayeux(data("Error", None, ref=99, code=404), "m9"), 11),                                 # 12 another request
]
W1_SEQS = [1, 3, 4, 5, 6, 8, 9, 10, 11]
W1_CHANGES = {
    1: dict(notification_type="StatusChange", reference_id="1", state_to="Invited",
            capabilities_granted=["Accept", "Reject"], user_data_changes={"added": {"Subject": "Refund"}},
            request_outcome="succeeded"),
    3: dict(notification_type="StatusChange", reference_id="1", status="duplicate of seq 1",
            request_outcome="succeeded"),
    4: dict(notification_type="StatusChange", reference_id="3", state_from="Invited", state_to="Processing",
            capabilities_granted=["Transfer", "Complete"], capabilities_revoked=["Accept", "Reject"],
            request_outcome="succeeded"),
    5: dict(notification_type="PropertiesUpdated", reference_id="4", user_data_changes={"added": {"Note": "n1"}},
            request_outcome="failed"),
    6: dict(notification_type="Error", reference_id="4", request_outcome="failed", error_code="500",
            error_message="timeout"),
    8: dict(notification_type="Deleted"),
    9: dict(notification_type="Error", reference_id="5", request_outcome="failed", error_code="409",
            error_message="locked"),
    10: dict(notification_type="PropertiesUpdated", reference_id="6", capabilities_revoked=["Transfer"],
             user_data_changes={"added": {"Queue": "q"}, "changed": {"Note": ["n1", "n2"]}, "removed": ["Subject"]},
             request_outcome="succeeded"),
    11: dict(notification_type="StatusChange", reference_id="7", state_from="Processing", state_to="Completed",
             capabilities_revoked=["Complete"], request_outcome="succeeded"),
}


def expected_entry(seq: int) -> dict:
    entry = {"seq": seq, "received_at": t(seq - 1), "source": "agent-1", "notification_type": None,
             "reference_id": None, "status": "projected", "state_from": None, "state_to": None,
             "capabilities_granted": [], "capabilities_revoked": [], "user_data_changes": None,
             "request_outcome": None, "error_code": None, "error_message": None}
    entry.update(W1_CHANGES[seq])
    return entry


@pytest.fixture
def trail_url(db_url):
    """A store holding TRAIL_LINES in its log only (history and state read the log alone)."""
    load_store(db_url, TRAIL_LINES, project=False)
    return db_url


def test_history_json_is_every_row_about_the_workitem(trail_url):
    entries = json.loads(run("history", "W1", "--json", "--db", trail_url).stdout)
    assert [e["seq"] for e in entries] == W1_SEQS
    for e in entries:
        assert list(e) == ENTRY_KEYS
        expected = expected_entry(e["seq"])
        assert dt.datetime.fromisoformat(e["received_at"]) == expected.pop("received_at")
        if e["seq"] == 8:
            assert e["status"].startswith("quarantined: ") and "Deleted" in e["status"], e
            e["status"] = expected["status"]
        assert {k: v for k, v in e.items() if k != "received_at"} == expected


def test_history_csv_has_a_header_and_one_row_per_log_row(trail_url):
    out = run("history", "W1", "--csv", "--db", trail_url).stdout
    reader = csv.DictReader(io.StringIO(out))
    assert reader.fieldnames == ENTRY_KEYS
    rows = list(reader)
    assert [int(r["seq"]) for r in rows] == W1_SEQS
    by_seq = {int(r["seq"]): r for r in rows}
    assert by_seq[3]["status"] == "duplicate of seq 1"
    assert json.loads(by_seq[4]["capabilities_granted"]) == ["Transfer", "Complete"]
    assert json.loads(by_seq[4]["capabilities_revoked"]) == ["Accept", "Reject"]
    assert json.loads(by_seq[10]["user_data_changes"]) == W1_CHANGES[10]["user_data_changes"]
    assert (by_seq[6]["reference_id"], by_seq[6]["request_outcome"], by_seq[6]["error_code"]) == ("4", "failed", "500")
    assert by_seq[1]["error_code"] == "" and by_seq[1]["state_from"] == ""  # None is an empty field
    assert dt.datetime.fromisoformat(by_seq[11]["received_at"]) == t(10)


def test_history_table_lists_the_seqs(trail_url):
    out = run("history", "W1", "--db", trail_url).stdout
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["seq", "received_at", "source"]
    assert [int(line.split()[0]) for line in lines[2:]] == W1_SEQS
    for fragment in ("Invited -> Processing", "- -> Invited", "duplicate of seq 1", "4 failed", "500 timeout",
                     "409 locked", "Transfer,Complete", f"{t(3):%Y-%m-%d %H:%M:%S.%f}"):
        assert fragment in out, fragment


def test_history_of_an_unknown_workitem_fails_clearly(trail_url):
    result = run("history", "NOPE", "--db", trail_url, ok=False)
    assert result.exit_code == 1
    assert "no log row mentions workitem 'NOPE'" in result.output
    assert "Traceback" not in result.output


def test_history_request_outcome_is_the_request_outcomes_row(engine):
    feed(engine, [
        envelope(bayeux(data("StatusChange", "W1", state="Invited", ref=1), "1"), "agent-1", at(0)),
        envelope(bayeux(data("Error", "W2", ref=1, code=500), "2"), "agent-1", at(1)),
    ])
    runner.project(engine)
    with db.snapshot(engine) as conn:
        (outcome,) = conn.execute(text("SELECT workitem_id, outcome FROM request_outcomes")).all()
        assert tuple(outcome) == ("W1", "failed")
        (entry,) = audit.history(conn, "W1")
    assert entry["request_outcome"] == "failed"


# -- state: the command ------------------------------------------------------------------------

def test_state_at_a_seq_or_an_instant(trail_url):
    (found,) = json.loads(run("state", "W1", "--seq", 4, "--json", "--db", trail_url).stdout)
    assert {k: found[k] for k in ("workitem_id", "state", "capabilities", "user_data", "first_seq", "last_seq",
                                  "notification_count", "error_count")} == {
        "workitem_id": "W1", "state": "Processing", "capabilities": ["Transfer", "Complete"],
        "user_data": {"Subject": "Refund"}, "first_seq": 1, "last_seq": 4, "notification_count": 2,
        "error_count": 0}
    assert found["open_capabilities_since_seq"] == {"Transfer": 4, "Complete": 4}
    assert set(found) == set(WORKITEM_COLUMNS) | {"last_applied_seq", "open_capabilities_since_seq"}

    def state_as_of(stamp: str) -> dict:
        (row,) = json.loads(run("state", "W1", "--as-of", stamp, "--json", "--db", trail_url).stdout)
        return row

    just_before_4 = t(3) - dt.timedelta(microseconds=1)
    assert state_as_of(just_before_4.isoformat())["state"] == "Invited"
    assert state_as_of(t(3).isoformat())["state"] == "Processing"  # received at that instant: included
    # The same instant in another offset, and without offset (UTC).
    assert state_as_of((t(3) - dt.timedelta(microseconds=1)).astimezone(dt.timezone(dt.timedelta(hours=1)))
                       .isoformat())["state"] == "Invited"
    assert state_as_of(t(3).replace(tzinfo=None).isoformat())["state"] == "Processing"
    late = state_as_of(t(20).isoformat())
    assert (late["state"], late["capabilities"], late["error_count"]) == ("Completed", [], 1)
    assert late == json.loads(run("state", "W1", "--seq", 12, "--json", "--db", trail_url).stdout)[0]

    csv_rows = list(csv.DictReader(io.StringIO(run("state", "W1", "--seq", 4, "--csv", "--db", trail_url).stdout)))
    assert len(csv_rows) == 1 and csv_rows[0]["state"] == "Processing"
    assert json.loads(csv_rows[0]["open_capabilities_since_seq"]) == {"Transfer": 4, "Complete": 4}
    table = run("state", "W1", "--seq", 4, "--db", trail_url).stdout
    assert re.search(r"^state\s+Processing\s*$", table, re.M), table


def test_state_needs_exactly_one_of_as_of_and_seq(trail_url):
    for args in ([], ["--seq", 3, "--as-of", "2026-11-02T08:00:00Z"]):
        result = run("state", "W1", *args, "--db", trail_url, ok=False)
        assert result.exit_code == 2 and "exactly one of --as-of TIMESTAMP or --seq N" in result.output
    result = run("state", "W1", "--as-of", "yesterday", "--db", trail_url, ok=False)
    assert result.exit_code == 2 and "--as-of" in result.output
    result = run("state", "W1", "--seq", 0, "--db", trail_url, ok=False)
    assert result.exit_code == 1 and "'W1' was not known at seq 0" in result.output
    result = run("state", "W1", "--as-of", t(0).replace(year=2025).isoformat(), "--db", trail_url, ok=False)
    assert result.exit_code == 1 and "was not known as of 2025-11-02" in result.output
    result = run("state", "NOPE", "--seq", 100, "--db", trail_url, ok=False)
    assert result.exit_code == 1 and "'NOPE' was not known" in result.output


# -- state and history: properties over generated streams -------------------------------------

WIDS = ["W1", "W2", "W3"]
ABSENT_WID = "W9"
STATES = ["Invited", "Processing", "Completed", "Revoked"]
CAPS = ["Accept", "Reject", "Complete", "Transfer"]
SOURCES = ["agent-1", "agent-2"]
GARBAGE = ["not json", "[1, 2]", '{"data": {"messageType": "WorkitemStateChangeMessage", "notif']
QUARANTINED = [
    data("Deleted", "W1", state="Completed", ref=1),
    data("StatusChange", "W2", state="Completed", caps=[], message_type="CallStateChangeMessage"),
    data("StatusChange", None, state="Completed", ref=2),
    data("Error", None, code=500),
]


@st.composite
def notification(draw) -> dict:
    """A notification's data: state/capability/userData changes, errors (some carrying only a
    referenceId), and data that the rules quarantine."""
    kind = draw(st.sampled_from(["change"] * 4 + ["error"] * 2 + ["quarantined"]))
    if kind == "quarantined":
        return draw(st.sampled_from(QUARANTINED))
    kw: dict = {}
    if kind == "error":
        wid = draw(st.none() | st.sampled_from(WIDS))
        if wid is None or draw(st.booleans()):
            kw["ref"] = draw(st.integers(1, 5))
        if draw(st.booleans()):
            kw["code"] = draw(st.sampled_from([403, 500, "E1"]))
        if draw(st.booleans()):  # an Error carrying a resource still changes nothing
            kw["state"], kw["caps"] = draw(st.sampled_from(STATES)), []
        return data("Error", wid, **kw)
    ntype = draw(st.sampled_from(["StatusChange", "PropertiesUpdated"]))
    if ntype == "StatusChange" or draw(st.booleans()):
        kw["state"] = draw(st.sampled_from(STATES))
    if draw(st.booleans()):
        kw["caps"] = draw(st.lists(st.sampled_from(CAPS), unique=True, max_size=3))
    if draw(st.integers(0, 2)) == 0:
        kw["user_data"] = draw(st.dictionaries(st.sampled_from("abc"), st.integers(0, 2), max_size=3))
    if draw(st.booleans()):
        kw["ref"] = draw(st.integers(1, 5))
    return data(ntype, draw(st.sampled_from(WIDS)), **kw)


@st.composite
def mixed_stream(draw):
    """(lines, cut seqs): envelopes, Bayeux messages and bare data, lines delivered twice, garbage."""
    lines = [envelope(bayeux(data("StatusChange", "W1", state="Invited", caps=["Accept"], ref=1), "p1"),
                      "agent-1", at(0))]
    for _ in range(draw(st.integers(0, 30))):
        roll = draw(st.integers(0, 9))
        if roll == 0:
            lines.append(draw(st.sampled_from(lines)))  # the same line again
        elif roll == 1:
            lines.append(draw(st.sampled_from(GARBAGE)))
        else:
            d = draw(notification())
            shape = draw(st.sampled_from(["envelope", "bayeux", "bare"]))
            message = bare(d) if shape == "bare" else bayeux(d, draw(st.none() | st.integers(1, 8).map(str)))
            if shape == "envelope":
                message = envelope(message, draw(st.sampled_from(SOURCES)), at(draw(st.integers(0, 5000))))
            lines.append(message)
    cuts = draw(st.lists(st.integers(0, len(lines)), min_size=1, max_size=4, unique=True))
    return lines, cuts


@st.composite
def timed_stream(draw):
    """(envelope lines whose received_at never decreases with seq, instants to look at)."""
    now = at(0)
    sent: list[tuple[str, str]] = []  # (source, message), for delivering one again later
    lines = []
    for _ in range(draw(st.integers(1, 30))):
        now += dt.timedelta(microseconds=draw(st.sampled_from([0, 1, 999, 1_000_000, 61_000_000])))
        roll = draw(st.integers(0, 9))
        if roll == 0 and sent:
            source, message = draw(st.sampled_from(sent))  # same Bayeux id and source: a duplicate
        elif roll == 1:
            lines.append(json.dumps({"received_at": now.isoformat(), "source": draw(st.sampled_from(SOURCES)),
                                     "line": draw(st.sampled_from(GARBAGE))}))
            continue
        else:
            source = draw(st.sampled_from(SOURCES))
            message = bayeux(draw(notification()), draw(st.none() | st.integers(1, 8).map(str)))
            sent.append((source, message))
        lines.append(envelope(message, source, now))
    picks = draw(st.lists(st.tuples(st.integers(0, len(lines) - 1), st.sampled_from([-1, 0, 1])),
                          min_size=1, max_size=6))
    return lines, picks


PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _require(kind, request):
    if kind == "postgresql":
        request.getfixturevalue("pg_admin")  # skips (or fails under CI) without a server


def open_intervals(computed: dict, wid: str) -> dict:
    return {c["capability"]: c["granted_seq"] for c in computed["capability_history"]
            if c["workitem_id"] == wid and c["revoked_seq"] is None}


def check_state_at_cut(conn, cut: int) -> None:
    computed = runner.compute(conn, cut)
    rows = {r["workitem_id"]: r for r in computed["workitems"]}
    for wid in [*WIDS, ABSENT_WID]:
        found = audit.state(conn, wid, upto_seq=cut)
        restricted = None if found is None else {k: found[k] for k in WORKITEM_COLUMNS}
        assert restricted == rows.get(wid), (wid, cut)
        if found is not None:
            assert found["open_capabilities_since_seq"] == open_intervals(computed, wid), (wid, cut)


def check_history(conn, wid: str, computed: dict) -> None:
    """history(wid) against the log and the projections computed from all of it."""
    c = event_log.c
    log = conn.execute(select(c.seq, c.source, c.notification_type, c.workitem_id, c.reference_id, c.payload,
                              c.duplicate_of, c.quarantine_reason).order_by(c.seq)).all()
    trail = audit.history(conn, wid)
    requests = {(r.source, r.reference_id) for r in log if r.workitem_id == wid and r.reference_id is not None}
    assert [e["seq"] for e in trail] == [
        r.seq for r in log
        if r.workitem_id == wid or (r.workitem_id is None and (r.source, r.reference_id) in requests)]
    by_seq = {r.seq: r for r in log}
    outcomes = {(o["source"], o["reference_id"]): o["outcome"] for o in computed["request_outcomes"]}
    user_data: dict = {}
    for e in trail:
        r = by_seq[e["seq"]]
        assert (e["source"], e["notification_type"], e["reference_id"]) == (r.source, r.notification_type,
                                                                             r.reference_id)
        if r.quarantine_reason is not None:
            assert e["status"] == f"quarantined: {r.quarantine_reason}"
        elif r.duplicate_of is not None:
            assert e["status"] == f"duplicate of seq {r.duplicate_of}"
        else:
            assert e["status"] == "projected"
        if r.reference_id is None:
            assert e["request_outcome"] is None
        else:
            assert e["request_outcome"] == outcomes.get((r.source, r.reference_id))
        if e["status"] == "projected" and r.notification_type == "Error":
            d = load_json(r.payload)["data"]
            assert (e["error_code"], e["error_message"]) == (as_text(d.get("errorCode")),
                                                             as_text(d.get("errorMessage")))
        else:
            assert e["error_code"] is None and e["error_message"] is None
        changes = e["user_data_changes"] or {}
        user_data.update(changes.get("added", {}))
        user_data.update({k: new for k, (_, new) in changes.get("changed", {}).items()})
        for k in changes.get("removed", []):
            del user_data[k]
    transitions = sorted((x["seq"], x["from_state"], x["to_state"]) for x in computed["workitem_transitions"]
                         if x["workitem_id"] == wid)
    assert [(e["seq"], e["state_from"], e["state_to"]) for e in trail if e["state_to"] is not None] == transitions
    intervals = [x for x in computed["capability_history"] if x["workitem_id"] == wid]
    assert sorted((cap, e["seq"]) for e in trail for cap in e["capabilities_granted"]) == sorted(
        (x["capability"], x["granted_seq"]) for x in intervals)
    assert sorted((cap, e["seq"]) for e in trail for cap in e["capabilities_revoked"]) == sorted(
        (x["capability"], x["revoked_seq"]) for x in intervals if x["revoked_seq"] is not None)
    row = next((w for w in computed["workitems"] if w["workitem_id"] == wid), None)
    assert user_data == (row["user_data"] if row and row["user_data"] is not None else {})


@pytest.mark.parametrize(("kind", "examples"), [
    pytest.param("sqlite", 30, id="sqlite"),
    pytest.param("postgresql", 8, id="postgresql", marks=pytest.mark.postgres),
])
def test_state_upto_seq_equals_the_projection_computed_at_that_seq(kind, examples, request):
    _require(kind, request)

    @settings(max_examples=examples, **PROPERTY)
    @given(mixed_stream())
    def check(generated):
        lines, cuts = generated
        with fresh_store(kind) as engine:
            feed(engine, lines, source="agent-1")
            with db.snapshot(engine) as conn:
                for cut in [*cuts, len(lines)]:
                    check_state_at_cut(conn, cut)
                computed = runner.compute(conn)
                for wid in WIDS:
                    if conn.execute(select(func.count()).where(event_log.c.workitem_id == wid)).scalar_one():
                        check_history(conn, wid, computed)
                    else:
                        assert audit.history(conn, wid) == []

    check()


@pytest.mark.parametrize(("kind", "examples"), [
    pytest.param("sqlite", 30, id="sqlite"),
    pytest.param("postgresql", 8, id="postgresql", marks=pytest.mark.postgres),
])
def test_state_as_of_equals_state_at_the_last_seq_received_by_then(kind, examples, request):
    _require(kind, request)

    @settings(max_examples=examples, **PROPERTY)
    @given(timed_stream())
    def check(generated):
        lines, picks = generated
        with fresh_store(kind) as engine:
            feed(engine, lines, source="file")
            with db.snapshot(engine) as conn:
                received = conn.execute(select(event_log.c.seq, event_log.c.received_at).order_by(event_log.c.seq)).all()
                assert [r.seq for r in received] == list(range(1, len(lines) + 1))
                times = [r.received_at for r in received]
                assert times == sorted(times)  # the premise: received_at never decreases with seq
                instants = {times[i] + dt.timedelta(microseconds=d) for i, d in picks}
                instants |= {times[0] - dt.timedelta(microseconds=1), times[-1]}
                for instant in sorted(instants):
                    last = max((r.seq for r in received if r.received_at <= instant), default=0)
                    for wid in [*WIDS, ABSENT_WID]:
                        assert audit.state(conn, wid, as_of=instant) == audit.state(conn, wid, upto_seq=last), (
                            wid, instant, last)

    check()


# -- views --------------------------------------------------------------------------------------

VIEW_KEYS = {
    "workitem_state_durations": ("workitem_id", "entered_seq"),
    "request_outcome_summary": ("source", "hour"),
    "capability_timeline": ("workitem_id", "capability", "granted_seq"),
}
VIEW_COLUMNS = {
    "workitem_state_durations": ["workitem_id", "state", "entered_seq", "entered_at", "left_seq", "left_at",
                                 "seconds"],
    "request_outcome_summary": ["source", "hour", "requests", "failed", "failure_rate"],
    "capability_timeline": ["workitem_id", "capability", "granted_seq", "granted_at", "revoked_seq", "revoked_at",
                            "seconds", "is_open"],
}
TIME_COLUMNS = {"entered_at", "left_at", "granted_at", "revoked_at"}
SQLITE_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")


def instant(value):
    """A view's timestamp as an aware UTC datetime: SQLite text or a PostgreSQL datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        assert SQLITE_TIME.match(value), value
        return dt.datetime.fromisoformat(value).replace(tzinfo=UTC)
    assert value.tzinfo is not None, value
    return value.astimezone(UTC)


def view_rows(url: str) -> dict[str, list[dict]]:
    """Every row of every view through raw SQL, timestamps as UTC instants, in key order."""
    engine = open_store(url)
    out = {}
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # An analyst's session in another time zone (+05:45) must see the same UTC hours.
                conn.exec_driver_sql("SET TIME ZONE 'Asia/Kathmandu'")
            for name, columns in VIEW_COLUMNS.items():
                result = conn.exec_driver_sql(f"SELECT * FROM {name}")
                assert list(result.keys()) == columns
                rows = [{k: instant(v) if k in TIME_COLUMNS else v for k, v in r._mapping.items()} for r in result]
                out[name] = sorted(rows, key=lambda r: tuple(r[k] for k in VIEW_KEYS[name]))
    finally:
        engine.dispose()
    return out


@pytest.mark.postgres
def test_views_are_identical_on_sqlite_and_postgresql(tmp_path, pg_url):
    lines = list(simulate(3000, agents=6, seed=3))
    views = {}
    for url in (f"sqlite:///{tmp_path / 'sim.db'}", pg_url):
        engine = open_store(url)
        import_lines(engine, lines, source="sim")
        runner.project(engine)
        engine.dispose()
        views[kind_of(url)] = view_rows(url)
    sqlite_views, pg_views = views["sqlite"], views["postgresql"]
    for name in VIEW_COLUMNS:
        assert len(sqlite_views[name]) == len(pg_views[name]) > 5, name
        for a, b in zip(sqlite_views[name], pg_views[name], strict=True):
            assert a == b, (name, a, b)
            for column in ("seconds", "failure_rate"):
                if a.get(column) is not None:
                    assert type(a[column]) is float and type(b[column]) is float
    durations = sqlite_views["workitem_state_durations"]
    assert any(r["seconds"] is None for r in durations) and any(r["seconds"] is not None for r in durations)
    assert any(r["seconds"] != round(r["seconds"], 3) for r in durations if r["seconds"] is not None)  # microseconds
    summary = sqlite_views["request_outcome_summary"]
    assert {r["source"] for r in summary} == {f"agent-{i:03d}" for i in range(1, 7)}
    assert any(0 < r["failure_rate"] < 1 for r in summary)
    timeline = sqlite_views["capability_timeline"]
    assert {r["is_open"] for r in timeline} == {0, 1}


def u(day: int, clock: str) -> dt.datetime:
    """2026-11-<day> <clock> UTC, clock 'HH:MM:SS.ffffff'."""
    return dt.datetime.fromisoformat(f"2026-11-{day:02d} {clock}").replace(tzinfo=UTC)


VIEW_LINES = [
    # seq, workitem data, source, received_at
    (data("StatusChange", "W1", state="Invited", caps=["Accept", "Reject"], ref=1), "agent-1", u(2, "08:00:41.999980")),
    (data("StatusChange", "W1", state="Processing", caps=["Complete"], ref=2), "agent-1", u(2, "08:00:58.050675")),
    (data("Error", None, ref=3, code=500), "agent-1", u(2, "08:59:59.999999")),
    (data("PropertiesUpdated", "W1", user_data={"a": 1}, ref=5), "agent-1", u(2, "09:00:00.000000")),
    (data("StatusChange", "W2", state="Invited", caps=["Accept"]), "agent-1", u(2, "23:59:59.999999")),
    (data("StatusChange", "W2", state="Completed", caps=[], ref=4), "agent-1", u(3, "00:00:00.000001")),
    (data("StatusChange", "W3", state="Invited", caps=["Accept"], ref=1), "agent-2", u(2, "08:00:00.500000")),
    (data("StatusChange", "W3", state="Processing", caps=["Accept", "Complete"], ref=2), "agent-2",
     u(4, "08:00:00.250000")),
    (data("Error", "W3", ref=2, code=409), "agent-2", u(4, "08:00:01.000000")),
    # received out of order (merged captures): a negative stay
    (data("StatusChange", "W4", state="Invited"), "agent-2", u(2, "08:00:10.000001")),
    (data("StatusChange", "W4", state="Processing"), "agent-2", u(2, "08:00:09.999999")),
]
T = {seq: when for seq, (_, _, when) in enumerate(VIEW_LINES, start=1)}


def test_view_semantics_on_a_small_stream(db_url):
    load_store(db_url, [envelope(bare(d), source, when) for d, source, when in VIEW_LINES])
    views = view_rows(db_url)
    assert views["workitem_state_durations"] == [
        dict(zip(VIEW_COLUMNS["workitem_state_durations"], row, strict=True)) for row in [
            ("W1", "Invited", 1, T[1], 2, T[2], 16.050695),
            ("W1", "Processing", 2, T[2], None, None, None),
            ("W2", "Invited", 5, T[5], 6, T[6], 0.000002),
            ("W2", "Completed", 6, T[6], None, None, None),
            ("W3", "Invited", 7, T[7], 8, T[8], 172799.75),
            ("W3", "Processing", 8, T[8], None, None, None),
            ("W4", "Invited", 10, T[10], 11, T[11], -0.000002),
            ("W4", "Processing", 11, T[11], None, None, None),
        ]]
    assert views["capability_timeline"] == [
        dict(zip(VIEW_COLUMNS["capability_timeline"], row, strict=True)) for row in sorted([
            ("W1", "Accept", 1, T[1], 2, T[2], 16.050695, 0),
            ("W1", "Reject", 1, T[1], 2, T[2], 16.050695, 0),
            ("W1", "Complete", 2, T[2], None, None, None, 1),
            ("W2", "Accept", 5, T[5], 6, T[6], 0.000002, 0),
            ("W3", "Accept", 7, T[7], None, None, None, 1),
            ("W3", "Complete", 8, T[8], None, None, None, 1),
        ], key=lambda r: (r[0], r[1], r[2]))]
    assert views["request_outcome_summary"] == [
        dict(zip(VIEW_COLUMNS["request_outcome_summary"], row, strict=True)) for row in [
            ("agent-1", "2026-11-02 08:00:00", 3, 1, 1 / 3),
            ("agent-1", "2026-11-02 09:00:00", 1, 0, 0.0),
            ("agent-1", "2026-11-03 00:00:00", 1, 0, 0.0),
            ("agent-2", "2026-11-02 08:00:00", 1, 0, 0.0),
            ("agent-2", "2026-11-04 08:00:00", 1, 1, 1.0),
        ]]
    for row in views["request_outcome_summary"]:
        assert type(row["failure_rate"]) is float and type(row["requests"]) is int and type(row["failed"]) is int
    # Through the Core declarations of store/schema.py the timestamps come back as UTC datetimes.
    engine = open_store(db_url)
    with engine.connect() as conn:
        for view in (v for v in VIEWS if v.name in VIEW_COLUMNS):
            declared = [dict(r._mapping) for r in conn.execute(select(view))]
            assert sorted(declared, key=lambda r: tuple(r[k] for k in VIEW_KEYS[view.name])) == views[view.name]
    engine.dispose()


# -- read-only access ---------------------------------------------------------------------------

def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sqlite_store(tmp_path):
    path = tmp_path / "store.db"
    load_store(f"sqlite:///{path}", TRAIL_LINES)
    return path


WRITES = [
    "DELETE FROM workitems",
    "UPDATE workitems SET state = 'Gone'",
    "INSERT INTO workitems (workitem_id, first_seq, last_seq, first_seen_at, last_seen_at, notification_count, "
    "error_count) VALUES ('X', 1, 1, '2026-11-02 08:00:00.000000', '2026-11-02 08:00:00.000000', 1, 0)",
    "DROP VIEW capability_timeline",
    "CREATE TABLE scratch (x INTEGER)",
    "PRAGMA user_version = 7",
]


def test_query_cannot_change_a_sqlite_store(sqlite_store):
    before = file_digest(sqlite_store)
    assert row_count(str(sqlite_store), "workitems") == 2
    for sql in WRITES:
        result = run("query", sql, "--db", sqlite_store, ok=False)
        # Refused by query's authorizer before it runs (the file is open read-only besides).
        assert result.exit_code == 1 and "is refused by `query`" in result.output, (sql, result.output)
    assert row_count(str(sqlite_store), "workitems") == 2
    assert file_digest(sqlite_store) == before


def test_reading_commands_leave_a_sqlite_store_unchanged(sqlite_store, tmp_path):
    before = file_digest(sqlite_store)
    run("history", "W1", "--db", sqlite_store)
    run("state", "W1", "--seq", 4, "--db", sqlite_store)
    run("state", "W1", "--as-of", t(5).isoformat(), "--db", sqlite_store)
    run("status", "--db", sqlite_store)
    run("verify", "--db", sqlite_store)
    run("export", "-o", tmp_path / "out.jsonl", "--db", sqlite_store)
    run("query", "SELECT COUNT(*) FROM event_log", "--db", sqlite_store)
    assert file_digest(sqlite_store) == before
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == len(TRAIL_LINES)


@pytest.fixture
def query_url(db_url, request):
    """Where `query` runs on db_url: the SQLite file itself; on PostgreSQL the URL of a
    grant-readonly role (`query` refuses db_url's superuser)."""
    if kind_of(db_url) == "sqlite":
        return db_url
    roles = request.getfixturevalue("roles")
    role = roles.new()
    run("grant-readonly", "--keep-connect", "*", role, "--login", "--with-log", "--db", db_url)
    return roles.url_of(role)


def test_query_selects_as_table_csv_and_json(db_url, query_url):
    load_store(db_url, TRAIL_LINES)
    db_url = query_url
    sql = "SELECT workitem_id, state, notification_count FROM workitems ORDER BY workitem_id"
    assert json.loads(run("query", sql, "--json", "--db", db_url).stdout) == [
        {"workitem_id": "W1", "state": "Completed", "notification_count": 6},
        {"workitem_id": "W2", "state": "Invited", "notification_count": 1},
    ]
    rows = list(csv.reader(io.StringIO(run("query", sql, "--csv", "--db", db_url).stdout)))
    assert rows == [["workitem_id", "state", "notification_count"], ["W1", "Completed", "6"], ["W2", "Invited", "1"]]
    table = run("query", sql, "--db", db_url).stdout.splitlines()
    assert table[0].split() == ["workitem_id", "state", "notification_count"]
    assert [line.split() for line in table[2:]] == [["W1", "Completed", "6"], ["W2", "Invited", "1"]]


def test_query_keeps_colon_and_percent_literals(db_url, query_url):
    load_store(db_url, TRAIL_LINES)
    db_url = query_url
    sql = ("SELECT 'a:b' AS colon, ':name' AS named, '100%' AS pct, '%s %(x)s' AS formats, COUNT(*) AS n "
           "FROM event_log WHERE source LIKE 'agent-%' AND payload LIKE '%\"referenceId\": %'")
    assert json.loads(run("query", sql, "--json", "--db", db_url).stdout) == [
        {"colon": "a:b", "named": ":name", "pct": "100%", "formats": "%s %(x)s", "n": 11}]


def test_query_runs_in_a_read_only_transaction(db_url, query_url):
    load_store(db_url, TRAIL_LINES)
    for sql in ("DELETE FROM workitems", "UPDATE workitems SET state = 'Gone'"):
        result = run("query", sql, "--db", query_url, ok=False)
        assert result.exit_code == 1 and "Traceback" not in result.output
    assert row_count(db_url, "workitems") == 2


@pytest.mark.postgres
@pytest.mark.parametrize("escape", ["COMMIT; ", "SET TRANSACTION READ WRITE; "])
def test_query_cannot_leave_the_read_only_transaction_on_postgresql(pg_url, roles, escape):
    load_store(pg_url, TRAIL_LINES)
    role = roles.new()
    run("grant-readonly", "--keep-connect", "*", role, "--login", "--db", pg_url)
    result = run("query", escape + "DELETE FROM workitems", "--db", roles.url_of(role), ok=None)
    assert row_count(pg_url, "workitems") == 2
    assert result.exit_code != 0


# -- grant-readonly (PostgreSQL) ------------------------------------------------------------------

class Roles:
    """Roles made for one test, with engines connecting as them; all dropped afterwards."""

    def __init__(self, url: str):
        self.url = url
        self.names: list[str] = []
        self.engines = []

    def new(self) -> str:
        # Mixed case and a hyphen: the role name must be quoted everywhere.
        name = f"wis_RO-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        return name

    def engine(self, name: str):
        engine = create_engine(make_url(self.url).set(username=name), isolation_level="AUTOCOMMIT")
        self.engines.append(engine)
        return engine

    def url_of(self, name: str) -> str:
        return make_url(self.url).set(username=name).render_as_string(hide_password=False)


@pytest.fixture
def roles(pg_url, pg_admin):
    made = Roles(pg_url)
    yield made
    for engine in made.engines:
        engine.dispose()
    # This teardown runs before pg_url's (it was set up after): the test database still exists, and
    # DROP OWNED BY there revokes the role's privileges on it and on the database itself.
    owner = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with owner.connect() as conn:
            for name in made.names:
                if conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": name}).first():
                    conn.execute(text(f'DROP OWNED BY "{name}"'))
    finally:
        owner.dispose()
    with pg_admin.connect() as conn:
        for name in made.names:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"),
                         {"r": name})
            conn.execute(text(f'DROP ROLE IF EXISTS "{name}"'))


def attempt(engine, sql: str) -> Exception | None:
    """Run one statement (committed if it works); the error, or None."""
    try:
        with engine.connect() as conn:
            result = conn.exec_driver_sql(sql)
            if result.returns_rows:
                result.all()
    except DBAPIError as exc:
        return exc
    return None


def role_attributes(pg_url: str, name: str):
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(
                "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolpassword IS NOT NULL AS has_password "
                "FROM pg_authid WHERE rolname = :r"), {"r": name}).first()
    finally:
        engine.dispose()


PROJECTIONS_AND_VIEWS = ["workitems", "workitem_transitions", "capability_history", "request_outcomes",
                         "workitem_state_durations", "request_outcome_summary", "capability_timeline"]
FORBIDDEN_WRITES = {
    "workitems": ["INSERT INTO workitems (workitem_id, first_seq, last_seq, first_seen_at, last_seen_at, "
                  "notification_count, error_count) VALUES ('X', 1, 1, now(), now(), 1, 0)",
                  "UPDATE workitems SET state = 'Gone'", "DELETE FROM workitems"],
    "workitem_transitions": ["UPDATE workitem_transitions SET to_state = 'Gone'", "DELETE FROM workitem_transitions"],
    "capability_history": ["UPDATE capability_history SET revoked_seq = 1", "DELETE FROM capability_history"],
    "request_outcomes": ["UPDATE request_outcomes SET outcome = 'failed'", "DELETE FROM request_outcomes"],
    "projection_checkpoints": ["UPDATE projection_checkpoints SET last_seq = 0"],
    "capability_timeline": ["UPDATE capability_timeline SET revoked_seq = 1", "DELETE FROM capability_timeline",
                            "INSERT INTO capability_timeline (workitem_id, capability, granted_seq, granted_at) "
                            "VALUES ('X', 'Y', 1, now())"],
    "workitem_state_durations": ["DELETE FROM workitem_state_durations"],
    "request_outcome_summary": ["DELETE FROM request_outcome_summary"],
}


def snapshot_counts(url: str) -> dict[str, int]:
    return {name: row_count(url, name) for name in [*PROJECTIONS_AND_VIEWS, "projection_checkpoints", "event_log", "imported_files"]}


@pytest.mark.postgres
def test_grant_readonly_role_can_only_select_projections_and_views(pg_url, roles):
    load_store(pg_url, TRAIL_LINES)
    role = roles.new()
    result = run("grant-readonly", "--keep-connect", "*", role, "--login", "--db", pg_url)
    assert f"role {role} may SELECT" in result.output and "event_log" not in result.output
    attributes = role_attributes(pg_url, role)
    assert (attributes.rolcanlogin, attributes.rolsuper, attributes.rolcreatedb, attributes.rolcreaterole) == (
        True, False, False, False)
    counts = snapshot_counts(pg_url)
    analyst = roles.engine(role)
    with analyst.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar_one() == role
        for name in [*PROJECTIONS_AND_VIEWS, "projection_checkpoints"]:
            assert len(conn.execute(text(f"SELECT * FROM {name}")).all()) == counts[name], name
    for statements in FORBIDDEN_WRITES.values():
        for sql in statements:
            assert attempt(analyst, sql) is not None, sql
    for sql in ("SELECT COUNT(*) FROM event_log", "SELECT * FROM imported_files",
                "INSERT INTO imported_files (file_name, sha256, rows, imported_at) VALUES ('x', 'y', 0, now())",
                "CREATE TABLE scratch (x integer)", "CREATE SCHEMA scratch", "CREATE VIEW v AS SELECT 1 AS x"):
        error = attempt(analyst, sql)
        assert error is not None and "permission denied" in str(error.orig), (sql, error)
    assert snapshot_counts(pg_url) == counts
    # The analyst's own commands: query works, history needs the log.
    url = roles.url_of(role)
    assert json.loads(run("query", "SELECT COUNT(*) AS n FROM capability_timeline", "--json", "--db", url).stdout) == [
        {"n": counts["capability_timeline"]}]
    result = run("history", "W1", "--db", url, ok=False)
    assert result.exit_code == 1 and "permission denied" in result.output


@pytest.mark.postgres
def test_grant_readonly_with_log_lets_the_role_audit(pg_url, roles):
    load_store(pg_url, TRAIL_LINES)
    role = roles.new()
    result = run("grant-readonly", "--keep-connect", "*", role, "--login", "--with-log", "--db", pg_url)
    assert "event_log" in result.output and "imported_files" in result.output
    url = roles.url_of(role)
    entries = json.loads(run("history", "W1", "--json", "--db", url).stdout)
    assert [e["seq"] for e in entries] == W1_SEQS
    (found,) = json.loads(run("state", "W1", "--seq", 4, "--json", "--db", url).stdout)
    assert found["state"] == "Processing"
    verified = run("verify", "--db", url).output
    assert "chain ok: 12 rows" in verified and "no seals" in verified  # (it reads seals, store_identity)
    assert "chain head: seq 12" in run("status", "--db", url).output
    analyst = roles.engine(role)
    counts = snapshot_counts(pg_url)
    for sql in ("INSERT INTO event_log (seq, received_at, source, payload, payload_sha256, chain_hash) "
                "VALUES (99, now(), 'x', '{}', 'x', 'x')",
                "UPDATE imported_files SET rows = 0", "DELETE FROM workitems", "CREATE TABLE scratch (x integer)"):
        assert attempt(analyst, sql) is not None, sql
    assert snapshot_counts(pg_url) == counts
    # Granting again without --with-log takes the log away.
    run("grant-readonly", "--keep-connect", "*", role, "--db", pg_url)
    assert attempt(analyst, "SELECT COUNT(*) FROM event_log") is not None
    assert attempt(analyst, "SELECT COUNT(*) FROM workitems") is None
    run("history", "W1", "--db", url, ok=False)


@pytest.mark.postgres
def test_grant_readonly_login_and_password(pg_url, roles, pg_admin):
    load_store(pg_url, TRAIL_LINES[:2])
    plain = roles.new()
    run("grant-readonly", "--keep-connect", "*", plain, "--db", pg_url)
    assert role_attributes(pg_url, plain).rolcanlogin is False  # a new role without --login cannot log in
    with pytest.raises(DBAPIError):
        with roles.engine(plain).connect():
            pass
    run("grant-readonly", "--keep-connect", "*", plain, "--login", "--db", pg_url)
    assert role_attributes(pg_url, plain).rolcanlogin is True
    run("grant-readonly", "--keep-connect", "*", plain, "--db", pg_url)
    assert role_attributes(pg_url, plain).rolcanlogin is True  # an existing role keeps what it had

    secret = "s3cr'et pw"
    with_password = roles.new()
    result = run("grant-readonly", "--keep-connect", "*", with_password, "--password-env", "ANALYST_PW", "--db", pg_url,
                 env={"ANALYST_PW": secret})
    assert secret not in result.output
    attributes = role_attributes(pg_url, with_password)
    assert (attributes.rolcanlogin, attributes.has_password) == (True, True)
    assert attempt(roles.engine(with_password), "SELECT COUNT(*) FROM workitems") is None

    missing = roles.new()
    result = run("grant-readonly", "--keep-connect", "*", missing, "--password-env", "NO_SUCH_VAR_WIS", "--db", pg_url,
                 env={"NO_SUCH_VAR_WIS": None}, ok=False)
    assert result.exit_code == 1 and "NO_SUCH_VAR_WIS" in result.output
    assert role_attributes(pg_url, missing) is None


def test_grant_readonly_refuses_sqlite(tmp_path):
    result = run("grant-readonly", "--keep-connect", "*", "analyst", "--login", "--db", tmp_path / "s.db", ok=False)
    assert result.exit_code == 1 and "PostgreSQL" in result.output


# -- status and verify agree on the chain head ----------------------------------------------------

def test_status_chain_head_is_the_head_verify_reaches(db_url):
    load_store(db_url, TRAIL_LINES)

    def heads():
        status = json.loads(run("status", "--json", "--db", db_url).stdout)["event_log"]
        report = json.loads(run("verify", "--json", "--db", db_url).stdout)
        assert report["ok"] is True and report["chain_break"] is None
        assert (status["head_seq"], status["chain_head"]) == (report["head_seq"], report["chain_head"])
        assert re.fullmatch(r"[0-9a-f]{64}", status["chain_head"])
        text_out = run("status", "--db", db_url).output
        assert f"chain head: seq {status['head_seq']} {status['chain_head']}" in text_out
        return status["head_seq"], status["chain_head"]

    seq, head = heads()
    assert seq == len(TRAIL_LINES)
    load_store(db_url, [env(bayeux(data("StatusChange", "W3", state="Invited"), "m10"), 12)])
    new_seq, new_head = heads()
    assert new_seq == seq + 1 and new_head != head
