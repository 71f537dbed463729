"""What live ingest adds to the log, on both engines, without a server: session markers and
snapshots (kind, session, their chain hashes), the duplicate rules for messages without ids, the
snapshot reconciliation of the projections, and the views ``ingest_gaps`` and ``notifications``.

Rows are written as export lines (what ``export`` writes for them), so each test also checks that
import reads them back as the live ingestor wrote them.
"""

from __future__ import annotations

import datetime as dt
import io
import json

from helpers import (
    at,
    bare,
    data,
    feed,
    fresh_store,
    live,
    log_rows,
    marker,
    projection_snapshot,
    snapshot,
    started,
    table_rows,
    unguard_log,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from store import audit, log
from store.export import export_lines
from store.ingest.files import import_stream
from store.projections import runner
from store.projections.workitems import ABSENT
from store.schema import capability_history, event_log, ingest_gaps, notifications, workitem_transitions, workitems
from store.verify import VerifyReport, verify, verify_chain

S = dt.timedelta(seconds=1)


def rows_by_seq(engine) -> dict[int, dict]:
    with engine.connect() as conn:
        return {r["seq"]: r for r in log_rows(conn)}


# -- kind, session and the chain ---------------------------------------------------------------------

def test_markers_and_snapshots_are_logged_with_kind_session_and_chained(engine):
    feed(engine, [
        bare(data("StatusChange", "W0", state="Invited")),  # a notification of the first version
        started("agent-1", "i1/agent-1/1", at(0)),
        snapshot("agent-1", "i1/agent-1/1", at(1), [{"id": "W1", "state": "Invited"}]),
        live(data("StatusChange", "W1", state="Processing"), "agent-1", "i1/agent-1/1", at(2)),
        marker("agent-1", "i1/agent-1/1", "nonsense", at(3)),
        snapshot("agent-1", "i1/agent-1/1", at(4), [], status_code=20),
    ])
    rows = rows_by_seq(engine)
    assert [(r["kind"], r["session"]) for r in rows.values()] == [
        ("notification", None), ("session", "i1/agent-1/1"), ("snapshot", "i1/agent-1/1"),
        ("notification", "i1/agent-1/1"), ("session", "i1/agent-1/1"), ("snapshot", "i1/agent-1/1")]
    assert [r["quarantine_reason"] for r in rows.values()] == [
        None, None, None, None, "session marker without an event of started, resumed, lost, ended, snapshot-failed",
        "snapshot statusCode is 20"]
    assert rows[2]["payload"] == json.dumps({"event": "started", "source": "agent-1",
                                             "handshake_at": at(0).isoformat()})
    assert all(rows[n][c] is None for n in (2, 3)
               for c in ("channel", "message_id", "notification_type", "workitem_id"))
    # The first row keeps the seven fields of the first version; the others add kind and session.
    prev = log.GENESIS_HASH
    for r in rows.values():
        old_style = log.chain_hash(prev, r["seq"], r["received_at"], r["source"], r["payload_sha256"],
                                   r["duplicate_of"], r["quarantine_reason"])
        assert (r["chain_hash"] == old_style) == (r["seq"] == 1)
        prev = r["chain_hash"]
    runner.project(engine)
    with engine.connect() as conn:
        assert verify(conn).ok
    # Turning a marker into a notification (or moving a row to another session) breaks the chain.
    for column, value in (("kind", "notification"), ("session", "i1/agent-1/2")):
        with engine.begin() as conn:
            unguard_log(conn)
            conn.execute(event_log.update().where(event_log.c.seq == 2).values({column: value}))
        with engine.connect() as conn:
            report = VerifyReport()
            verify_chain(conn, report)
            assert report.chain_break is not None and report.chain_break.seq == 2, column
        with engine.begin() as conn:
            unguard_log(conn)
            conn.execute(event_log.update().where(event_log.c.seq == 2)
                         .values({"kind": "session", "session": "i1/agent-1/1"}))


def test_export_and_import_keep_markers_snapshots_and_sessions(engine):
    session = "i1/agent-1/1"
    body = '{\n  "statusCode": 0,\n  "workitems": [{"id": "W1", "state": "Invited", "capabilities": ["Accept"]}]\n}'
    lines = [
        started("agent-1", session, at(0)),
        json.dumps({"received_at": at(1).isoformat(), "source": "agent-1", "kind": "snapshot", "session": session,
                    "line": body}),  # a pretty-printed body: several lines of text in one row
        live(data("StatusChange", "W1", state="Processing", caps=["Complete"]), "agent-1", session, at(2)),
        marker("agent-1", session, "ended", at(3)),
    ]
    feed(engine, lines)
    runner.project(engine)
    with engine.connect() as conn:
        original, projected = log_rows(conn), projection_snapshot(conn)
        exported = "".join(line + "\n" for line in export_lines(conn))
    assert exported.count("\n") == 4
    with fresh_store(engine.dialect.name) as copy:
        import_stream(copy, io.BytesIO(exported.encode()), file_name="export.jsonl", source="restore")
        runner.project(copy)
        with copy.connect() as conn:
            assert log_rows(conn) == original
            assert projection_snapshot(conn) == projected
            assert verify(conn).ok
            assert log_rows(conn)[1]["payload"] == body


# -- duplicates without ids --------------------------------------------------------------------------

def test_the_same_record_again_is_a_duplicate_but_repeated_bare_lines_are_not(engine):
    a = live(data("StatusChange", "W1", state="Invited"), "agent-1", "i1/agent-1/1", at(0))
    b = live(data("StatusChange", "W1", state="Invited"), "agent-1", "i1/agent-1/1", at(1))  # same text, later
    first = feed(engine, [a, b, bare(data("StatusChange", "W2")), bare(data("StatusChange", "W2"))],
                 file_name="first")
    assert first.duplicates == 0  # bare lines get instants of their own (one microsecond apart)
    second = feed(engine, [b, a, a], file_name="overlapping")  # an overlapping capture
    assert second.duplicates == 3
    rows = rows_by_seq(engine)
    assert [rows[n]["duplicate_of"] for n in (5, 6, 7)] == [2, 1, 1]
    assert rows[3]["received_at"] + dt.timedelta(microseconds=1) == rows[4]["received_at"]


def two_sessions(source="agent-1"):
    return [started(source, "i1/a/1", at(0)), started(source, "i2/a/1", at(0))]


def test_one_notification_received_by_two_sessions_is_stored_once(engine):
    invited, processing = data("StatusChange", "W1", state="Invited"), data("StatusChange", "W1", state="Processing")
    feed(engine, two_sessions() + [
        live(invited, "agent-1", "i1/a/1", at(10)),
        live(invited, "agent-1", "i2/a/1", at(10.2)),   # the other session's copy
        live(processing, "agent-1", "i2/a/1", at(11)),  # this one came first through i2
        live(processing, "agent-1", "i1/a/1", at(11.1)),
        live(invited, "agent-1", "i1/a/1", at(20)),     # invited again (a second, real notification)
        live(invited, "agent-1", "i2/a/1", at(20.3)),
        live(invited, "agent-1", "i2/a/1", at(30)),     # and a third, seen only by i2
    ])
    rows = rows_by_seq(engine)
    assert {n: r["duplicate_of"] for n, r in rows.items() if n > 2} == {3: None, 4: 3, 5: None, 6: 5, 7: None,
                                                                         8: 7, 9: None}
    runner.project(engine)
    with engine.connect() as conn:
        assert [t["to_state"] for t in table_rows(conn, workitem_transitions)] == ["Invited", "Processing", "Invited"]
        assert verify(conn).ok


def test_copies_from_before_a_session_started_or_outside_the_window_are_not_duplicates(engine):
    invited = data("StatusChange", "W1", state="Invited")
    feed(engine, [
        started("agent-1", "i1/a/1", at(0)),
        live(invited, "agent-1", "i1/a/1", at(5)),
        started("agent-1", "i2/a/1", at(9), handshake_at=at(8)),  # began listening after that one
        live(invited, "agent-1", "i2/a/1", at(9.5)),               # so this is a new notification
        live(invited, "agent-1", "i1/a/1", at(9.6)),               # i1's copy of it
        live(invited, "agent-1", "i1/a/1", at(200)),
        live(invited, "agent-1", "i2/a/1", at(200 + 61)),          # more than 60 s apart: not one
        live(invited, "agent-1", "i3/a/1", at(300)),               # a session with no start marker
        live(invited, "agent-1", "other", at(300)),
    ])
    assert {n: r["duplicate_of"] for n, r in rows_by_seq(engine).items() if r["kind"] == "notification"} == {
        2: None, 4: None, 5: 4, 6: None, 7: None, 8: None, 9: None}


@st.composite
def deliveries(draw):
    """Notifications (few distinct texts, so many are identical), each published at a time and
    received by every session listening then, with a small delay; the sessions' rows appended
    in an order that keeps each session's own order."""
    texts = [data("StatusChange", "W1", state=s) for s in ("Invited", "Processing")]
    count = draw(st.integers(1, 12))
    published = sorted(draw(st.lists(st.integers(1, 100), min_size=count, max_size=count)))
    notes = [(t, draw(st.sampled_from(range(len(texts))))) for t in published]
    sessions = []
    for n in range(draw(st.integers(1, 3))):
        # Handshakes half-way between publications, deliveries within 0.4 s: whether a session
        # could have a notification is never a close call (see RULES.md 3.3 for close calls).
        start = draw(st.integers(0, 50)) + 0.5 if n else 0
        end = draw(st.integers(int(start), 110))
        sessions.append((f"i{n}/a/1", start, end))
    # Each session's rows have instants of their own, in order (as GwsSession stamps them).
    queues = {name: [(t + draw(st.integers(0, 3)) / 10 + k / 1000, i)
                     for k, (t, i) in enumerate(notes) if start < t <= end]
              for name, start, end in sessions}
    order = []
    while any(queues.values()):
        name = draw(st.sampled_from(sorted(n for n, q in queues.items() if q)))
        order.append((name, *queues[name].pop(0)))
    received = {k for _, start, end in sessions for k, (t, _) in enumerate(notes) if start < t <= end}
    lines = [started("agent-1", name, at(start)) for name, start, _ in sessions]
    lines += [live(texts[i], "agent-1", name, at(t)) for name, t, i in order]
    return lines, len(received)


@settings(max_examples=60, deadline=None)
@given(deliveries())
def test_each_notification_is_kept_once_whatever_the_sessions_received(generated):
    lines, received = generated
    with fresh_store("sqlite") as engine:
        feed(engine, lines)
        with engine.connect() as conn:
            kept = conn.execute(select(event_log.c.seq).where(event_log.c.kind == "notification",
                                                              event_log.c.duplicate_of.is_(None))).all()
        assert len(kept) == received


# -- snapshots reconcile the projections -----------------------------------------------------------

RESOURCE = {"workitemType": "Inbound", "uri": "http://gws/w"}


def test_a_snapshot_reconciles_what_the_notifications_missed(engine):
    s1, s2 = "i1/agent-1/1", "i1/agent-1/2"
    feed(engine, [
        started("agent-1", s1, at(0)),
        live(data("StatusChange", "W1", state="Processing", caps=["Complete"]), "agent-1", s1, at(1)),
        live(data("StatusChange", "W2", state="Invited", caps=["Accept", "Reject"]), "agent-1", s1, at(2)),
        live(data("StatusChange", "W3", state="Processing", caps=["Complete"]), "agent-2", "i1/agent-2/1", at(3)),
        live(data("StatusChange", "W5", state="Completed", caps=[]), "agent-1", s1, at(4)),
        marker("agent-1", s1, "lost", at(5), cause="402::session_unknown"),
        # While nobody listened: W1 completed, W2 accepted, W4 arrived.
        started("agent-1", s2, at(60)),
        snapshot("agent-1", s2, at(61), [
            {"id": "W2", "state": "Processing", "capabilities": ["Complete", "Transfer"], "userData": {"k": 1},
             **RESOURCE},
            {"id": "W4", "state": "Invited", "capabilities": ["Accept"], **RESOURCE},
            {"state": "Invited"},  # no id: left out
        ]),
        live(data("StatusChange", "W4", state="Processing", caps=["Complete"]), "agent-1", s2, at(62)),
    ])
    runner.project(engine)
    with engine.connect() as conn:
        items = {w["workitem_id"]: w for w in table_rows(conn, workitems)}
        transitions = [(t["workitem_id"], t["from_state"], t["to_state"], t["notification_type"], t["seq"])
                       for t in table_rows(conn, workitem_transitions) if t["seq"] == 8]
        caps = {(c["workitem_id"], c["capability"]): (c["granted_seq"], c["revoked_seq"])
                for c in table_rows(conn, capability_history)}
        report = verify(conn)
    assert report.ok, report.differences
    assert (items["W1"]["state"], items["W1"]["capabilities"], items["W1"]["last_seq"]) == (ABSENT, [], 8)
    assert (items["W2"]["state"], items["W2"]["capabilities"], items["W2"]["user_data"]) == (
        "Processing", ["Complete", "Transfer"], {"k": 1})
    assert items["W3"]["state"] == "Processing"  # another agent's: not this snapshot's to close
    assert items["W5"]["state"] == "Completed" and items["W5"]["last_seq"] == 5  # closed already: untouched
    assert (items["W4"]["state"], items["W4"]["first_seq"], items["W4"]["notification_count"]) == ("Processing", 8, 1)
    assert all(items[w]["source"] == "agent-1" for w in ("W1", "W2", "W4"))
    assert sorted(transitions) == [("W1", "Processing", ABSENT, "Snapshot", 8),
                                   ("W2", "Invited", "Processing", "Snapshot", 8),
                                   ("W4", None, "Invited", "Snapshot", 8)]
    assert caps[("W1", "Complete")] == (2, 8) and caps[("W2", "Accept")] == (3, 8)
    assert caps[("W2", "Transfer")] == (8, None) and caps[("W4", "Accept")] == (8, 9)
    # The audit trail and time travel show the snapshot for what it is.
    with engine.connect() as conn:
        trail = {e["seq"]: e for e in audit.history(conn, "W1")}
        assert trail[8]["notification_type"] == "Snapshot" and trail[8]["status"] == "snapshot: not listed, closed"
        assert (trail[8]["state_from"], trail[8]["state_to"], trail[8]["capabilities_revoked"]) == (
            "Processing", ABSENT, ["Complete"])
        assert audit.history(conn, "W2")[-1]["status"] == "snapshot: listed"
        assert audit.state(conn, "W1", upto_seq=7)["state"] == "Processing"
        assert audit.state(conn, "W1", upto_seq=8)["state"] == ABSENT
        assert audit.state(conn, "W4", as_of=at(61))["state"] == "Invited"


def test_reconciliation_is_the_same_incrementally_rebuilt_and_in_memory(engine):
    lines = [started("agent-1", "s1", at(0))]
    for i in range(40):
        lines.append(live(data("StatusChange", f"W{i}", state="Invited", caps=["Accept"]), "agent-1", "s1", at(1 + i)))
    lines.append(marker("agent-1", "s1", "lost", at(50), cause="network"))
    lines.append(started("agent-1", "s2", at(60)))
    lines.append(snapshot("agent-1", "s2", at(61), [{"id": f"W{i}", "state": "Processing", "capabilities": []}
                                                      for i in range(0, 40, 2)]))
    for start in range(0, len(lines), 7):  # projected a few rows at a time
        feed(engine, lines[start:start + 7], file_name=f"part-{start}")
        runner.project(engine)
    with engine.connect() as conn:
        incremental = projection_snapshot(conn)
        assert verify(conn).ok
    runner.rebuild(engine)
    with engine.connect() as conn:
        assert projection_snapshot(conn) == incremental
    states = {w["workitem_id"]: w["state"] for w in incremental["workitems"]}
    assert states == {f"W{i}": "Processing" if i % 2 == 0 else ABSENT for i in range(40)}


# -- the views ------------------------------------------------------------------------------------

def gaps(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            select(ingest_gaps).order_by(ingest_gaps.c.source, ingest_gaps.c.gap_started_at))]


def test_ingest_gaps_lists_every_interval_nobody_followed_a_source(engine):
    feed(engine, [
        started("agent-1", "a1", at(0)),
        marker("agent-1", "a1", "lost", at(10), cause="402::session_unknown"),
        started("agent-1", "a2", at(20)),
        snapshot("agent-1", "a2", at(21), []),
        marker("agent-1", "a2", "ended", at(30), cause=None),
        # Two followers of agent-2: one of them losing its session is no gap.
        started("agent-2", "b1", at(0)), started("agent-2", "c1", at(1)),
        marker("agent-2", "b1", "lost", at(5), cause="network"),
        started("agent-2", "b2", at(8)),
        marker("agent-2", "c1", "lost", at(40), cause="the ingest process ended without closing the session"),
        marker("agent-2", "b2", "lost", at(35), cause="network"),
        started("agent-2", "b3", at(50)),
        marker("agent-2", "b3", "snapshot-failed", at(51), status=500),
        # agent-3 is followed still: no gap.
        started("agent-3", "d1", at(0)),
    ])
    found = gaps(engine)
    assert [(g["source"], g["gap_started_at"], g["gap_ended_at"], g["cause"], g["snapshot_seq"],
             g["lost_session"], g["resumed_session"]) for g in found] == [
        ("agent-1", at(10), at(20), "402::session_unknown", 4, "a1", "a2"),
        ("agent-1", at(30), None, None, None, "a2", None),
        ("agent-2", at(40), at(50), "the ingest process ended without closing the session", None, "c1", "b3"),
    ]
    assert found[0]["lost_seq"] == 2 and found[0]["resumed_seq"] == 3


def test_notifications_view_holds_only_notifications(engine):
    feed(engine, two_sessions() + [live(data("StatusChange", "W1"), "agent-1", "i1/a/1", at(5)),
                                   bare(data("StatusChange", "W2")), "garbage"])
    with engine.connect() as conn:
        rows = conn.execute(select(notifications.c.seq, notifications.c.session).order_by(notifications.c.seq)).all()
        columns = [c.name for c in notifications.columns]
        assert list(conn.execute(select(notifications)).keys()) == columns
    assert [tuple(r) for r in rows] == [(3, "i1/a/1"), (4, None), (5, None)]
