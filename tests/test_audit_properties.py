"""Time travel, property-tested on both engines: ``audit.state`` at a seq or an instant equals
the projection computed from the log cut at that point, and ``audit.history`` agrees with the log
and the projections computed from all of it.
"""

from __future__ import annotations

import datetime as dt
import json

from helpers import at, bare, bayeux, data, envelope, feed, fresh_store, on_both_engines
from hypothesis import strategies as st
from sqlalchemy import func, select

from store import audit, db
from store.notifications import as_text, load_json
from store.projections import runner
from store.schema import event_log, workitems

WORKITEM_COLUMNS = [c.name for c in workitems.columns]
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


@on_both_engines(mixed_stream(), sqlite=30, postgresql=8)
def test_state_upto_seq_equals_the_projection_computed_at_that_seq(engine_kind, generated):
    lines, cuts = generated
    with fresh_store(engine_kind) as engine:
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


@on_both_engines(timed_stream(), sqlite=30, postgresql=8)
def test_state_as_of_equals_state_at_the_last_seq_received_by_then(engine_kind, generated):
    lines, picks = generated
    with fresh_store(engine_kind) as engine:
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
