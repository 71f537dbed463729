"""Projection rules (workitems, transitions, capability intervals, request outcomes) and the runner."""

from __future__ import annotations

import datetime as dt

import pytest
from helpers import (
    at,
    bare,
    bayeux,
    checkpoints,
    data,
    envelope,
    feed,
    log_rows,
    projection_snapshot,
    table_rows,
)
from sqlalchemy import text, update

from store import log
from store.projections import PROJECTIONS, runner
from store.schema import (
    capability_history,
    projection_checkpoints,
    request_outcomes,
    workitem_transitions,
    workitems,
)
from store.simulate import simulate
from store.verify import verify

UTC = dt.UTC
CODE_VERSIONS = {cls.name: cls.version for cls in PROJECTIONS}


def env(d: dict, t: float, source: str = "A", mid: str | None = None) -> str:
    """An envelope line at at(t) from ``source``."""
    return envelope(bayeux(d, mid) if mid else bare(d), source, at(t))


def project_each(engine, lines):
    """Import the lines one by one, projecting after each (the most incremental way)."""
    for line in lines:
        feed(engine, [line])
        runner.project(engine)


@pytest.fixture(params=["batch", "one-by-one"])
def load(request):
    """Feeds lines then projects: all at once, or projecting after every line; same result."""
    def _load(engine, lines):
        if request.param == "batch":
            feed(engine, lines)
            runner.project(engine)
        else:
            project_each(engine, lines)
    return _load


def test_workitem_fields_change_only_when_their_key_is_present(engine, load):
    load(engine, [
        env(data("StatusChange", "W1", state="Invited", caps=["Accept", "Reject"], user_data={"a": 1},
                 workitemType="Inbound", uri="http://gws/w/W1"), 0),
        env(data("PropertiesUpdated", "W1", user_data={"a": 2, "b": [1, "x"]}), 1),
        env(data("PropertiesUpdated", "W1", caps=["Reject", "Accept", "Extra"]), 2),
        env(data("StatusChange", "W1", state="Processing"), 3),
        env(data("PropertiesUpdated", "W1", caps="not a list", state=None), 4),  # neither counts as present
    ])
    with engine.connect() as conn:
        (w,) = table_rows(conn, workitems)
        assert verify(conn).ok
    assert w == {
        "workitem_id": "W1", "state": "Processing", "workitem_type": "Inbound", "uri": "http://gws/w/W1",
        "capabilities": ["Reject", "Accept", "Extra"], "user_data": {"a": 2, "b": [1, "x"]},
        "first_seq": 1, "last_seq": 5, "first_seen_at": at(0), "last_seen_at": at(4),
        "notification_count": 5, "error_count": 0, "source": "A",
    }
    assert w["first_seen_at"].utcoffset() == dt.timedelta(0)


def test_capability_intervals_open_and_close(engine, load):
    load(engine, [
        env(data("StatusChange", "W1", state="Invited", caps=["A", "B"]), 0),  # 1: A, B open
        env(data("PropertiesUpdated", "W1", caps=["B", "C"]), 1),  # 2: A closes, C opens
        env(data("PropertiesUpdated", "W1", user_data={"k": 1}), 2),  # 3: no capabilities key
        env(data("StatusChange", "W1", state="Completed", caps=[]), 3),  # 4: B and C close
        env(data("StatusChange", "W1", state="Invited", caps=["A", "A"]), 4),  # 5: A again, new interval
        env(data("StatusChange", "W2", state="Invited", caps=["A"]), 5),  # 6: another workitem
        env(data("Error", "W2", ref=9, caps=[]), 6),  # 7: an Error never closes anything
    ])
    with engine.connect() as conn:
        rows = [tuple(r.values()) for r in table_rows(conn, capability_history)]
        (w1, w2) = table_rows(conn, workitems)
        assert verify(conn).ok
    assert rows == [
        ("W1", "A", 1, at(0), 2, at(1)),
        ("W1", "A", 5, at(4), None, None),
        ("W1", "B", 1, at(0), 4, at(3)),
        ("W1", "C", 2, at(1), 4, at(3)),
        ("W2", "A", 6, at(5), None, None),
    ]
    assert (w1["capabilities"], w2["capabilities"]) == (["A"], ["A"])


def test_transitions_record_each_change_of_state(engine, load):
    load(engine, [
        env(data("StatusChange", "W1", state="Invited", ref=1), 0),
        env(data("StatusChange", "W1", state="Invited", ref=2), 1),  # same state: no transition
        env(data("PropertiesUpdated", "W1", user_data={"x": 1}), 2),  # no state
        env(data("PropertiesUpdated", "W1", state="Processing", ref=3), 3, source="B"),
        env(data("Error", "W1", ref=4, state="Completed"), 4),  # Error: never a transition
        env(data("StatusChange", "W1", state="Completed", ref=5), 5),
        env(data("StatusChange", "W2", state="Processing"), 6),
    ])
    with engine.connect() as conn:
        rows = [tuple(r.values()) for r in table_rows(conn, workitem_transitions)]
        states = {w["workitem_id"]: w["state"] for w in table_rows(conn, workitems)}
    assert rows == [
        ("W1", 1, at(0), None, "Invited", "StatusChange", "A", "1"),
        ("W1", 4, at(3), "Invited", "Processing", "PropertiesUpdated", "B", "3"),
        ("W1", 6, at(5), "Processing", "Completed", "StatusChange", "A", "5"),
        ("W2", 7, at(6), None, "Processing", "StatusChange", "A", None),
    ]
    assert states == {"W1": "Completed", "W2": "Processing"}


def test_errors_fail_requests_and_leave_state_alone(engine, load):
    load(engine, [
        env(data("StatusChange", "W1", state="Invited", caps=["Accept"], ref=1), 0),  # 1
        env(data("Error", "W1", ref=2, code=403, message="not allowed", state="Bogus", caps=[],
                 user_data={"bogus": True}), 1),  # 2
        env(data("StatusChange", "W1", state="Processing", ref=2), 2),  # 3: same request
        env(data("Error", None, ref=3, code=500, message="timeout"), 3),  # 4: no workitem
        env(data("PropertiesUpdated", "W1", ref=3), 4, source="B"),  # 5: B's request 3 is another one
        env(data("Error", "W1", ref=4), 5),  # 6: no code, no message
        env(data("Error", "W1", ref=5, code=1, message="first"), 6),  # 7
        env(data("Error", "W1", ref=5), 7),  # 8: a later Error without code keeps the first
        env(data("StatusChange", "W3", state="Invited", ref="x-1"), 8),  # 9: text referenceId
    ])
    with engine.connect() as conn:
        w = {r["workitem_id"]: r for r in table_rows(conn, workitems)}
        outcomes = [tuple(r.values()) for r in table_rows(conn, request_outcomes)]
        transitions = [(t["seq"], t["to_state"]) for t in table_rows(conn, workitem_transitions)]
        caps = table_rows(conn, capability_history)
        assert verify(conn).ok
    w1 = w["W1"]
    assert (w1["state"], w1["capabilities"], w1["user_data"]) == ("Processing", ["Accept"], None)
    assert (w1["notification_count"], w1["error_count"], w1["last_seq"]) == (7, 4, 8)
    assert transitions == [(1, "Invited"), (3, "Processing"), (9, "Invited")]
    assert [(c["capability"], c["revoked_seq"]) for c in caps] == [("Accept", None)]
    assert outcomes == [
        ("A", "1", "W1", "succeeded", None, None, 1, 1, 1, at(0), at(0)),
        ("A", "2", "W1", "failed", "403", "not allowed", 2, 2, 3, at(1), at(2)),
        ("A", "3", None, "failed", "500", "timeout", 1, 4, 4, at(3), at(3)),
        ("A", "4", "W1", "failed", None, None, 1, 6, 6, at(5), at(5)),
        ("A", "5", "W1", "failed", "1", "first", 2, 7, 8, at(6), at(7)),
        ("A", "x-1", "W3", "succeeded", None, None, 1, 9, 9, at(8), at(8)),
        ("B", "3", "W1", "succeeded", None, None, 1, 5, 5, at(4), at(4)),
    ]


def test_a_request_succeeds_only_while_every_notification_is_a_change(engine):
    feed(engine, [env(data("StatusChange", "W1", state="Invited", ref=1), 0),
                  env(data("PropertiesUpdated", "W1", ref=1), 1)])
    runner.project(engine)
    with engine.connect() as conn:
        assert [r["outcome"] for r in table_rows(conn, request_outcomes)] == ["succeeded"]
    feed(engine, [env(data("Error", None, ref=1, code=404), 2)])
    runner.project(engine)
    with engine.connect() as conn:
        (row,) = table_rows(conn, request_outcomes)
        assert (row["outcome"], row["error_code"], row["notification_count"], row["workitem_id"]) == (
            "failed", "404", 3, "W1")


# -- the runner ----------------------------------------------------------------------------------

def test_checkpoints_and_idempotent_project(engine):
    assert runner.project(engine).applied == 0  # empty log: nothing to do, no error
    feed(engine, list(simulate(200, agents=3, seed=2, noise_rate=0.1)))
    first = runner.project(engine)
    with engine.connect() as conn:
        head = log.head(conn)[0]
        after_first = projection_snapshot(conn)
        marks = checkpoints(conn)
        stamps = [r["updated_at"] for r in table_rows(conn, projection_checkpoints)]
    assert head == 200 and (first.from_seq, first.to_seq) == (0, 200)
    assert 0 < first.applied < 200  # noise and duplicates are not applied
    assert marks == {name: (200, version) for name, version in CODE_VERSIONS.items()}
    assert all(s.tzinfo is not None for s in stamps)
    second = runner.project(engine)
    assert (second.applied, second.from_seq, second.to_seq, second.rebuilt) == (0, 200, 200, ())
    with engine.connect() as conn:
        assert projection_snapshot(conn) == after_first
        assert checkpoints(conn) == marks


def test_checkpoints_advance_over_rows_that_are_not_applied(engine):
    feed(engine, [bare(data())])
    runner.project(engine)
    feed(engine, ["garbage", bayeux(data("Deleted"), mid="1")])
    result = runner.project(engine)
    assert (result.applied, result.to_seq) == (0, 3)
    with engine.connect() as conn:
        assert checkpoints(conn) == {name: (3, version) for name, version in CODE_VERSIONS.items()}


def test_incremental_equals_rebuild_and_compute(engine):
    lines = list(simulate(600, agents=4, seed=3, noise_rate=0.05, duplicate_rate=0.05))
    for start in range(0, 600, 150):
        feed(engine, lines[start:start + 150], file_name=f"part{start}")
        runner.project(engine)
    with engine.connect() as conn:
        incremental = projection_snapshot(conn)
        computed = runner.compute(conn)
    assert all(incremental.values())
    rebuilt = runner.rebuild(engine)
    assert (rebuilt.from_seq, rebuilt.to_seq) == (0, 600)
    assert set(rebuilt.rebuilt) == set(CODE_VERSIONS)
    with engine.connect() as conn:
        assert projection_snapshot(conn) == incremental
        assert checkpoints(conn) == {name: (600, version) for name, version in CODE_VERSIONS.items()}
    for table, rows in incremental.items():
        key = lambda r: tuple(str(v) for v in r.values())  # noqa: E731
        assert sorted(computed[table], key=key) == sorted(rows, key=key), table


def test_rebuild_recomputes_from_seq_1(engine):
    feed(engine, list(simulate(120, agents=2, seed=4)))
    runner.project(engine)
    with engine.connect() as conn:
        good = projection_snapshot(conn)
    with engine.begin() as conn:
        conn.execute(update(workitems).values(state="CORRUPT"))
        conn.execute(text("DELETE FROM workitem_transitions WHERE seq > 50"))
        conn.execute(text("UPDATE capability_history SET revoked_seq = NULL, revoked_at = NULL"))
        conn.execute(text("INSERT INTO request_outcomes (source, reference_id, outcome, notification_count,"
                          " first_seq, last_seq, first_at, last_at) SELECT source, 'bogus', 'failed', 1, 1, 1,"
                          " first_at, last_at FROM request_outcomes LIMIT 1"))
    runner.project(engine)  # incremental: nothing new, nothing repaired
    with engine.connect() as conn:
        report = verify(conn)
        assert set(report.differences) == set(CODE_VERSIONS)
        assert report.chain_break is None
    runner.rebuild(engine)
    with engine.connect() as conn:
        assert projection_snapshot(conn) == good
        assert verify(conn).ok


def test_a_changed_version_rebuilds_every_projection(engine):
    """All four advance in step: the workitems projection decides what snapshots change for the
    others (projections/base.py)."""
    lines = list(simulate(300, agents=3, seed=8, duplicate_rate=0.05))
    feed(engine, lines[:200])
    runner.project(engine)
    with engine.begin() as conn:
        conn.execute(update(projection_checkpoints).where(projection_checkpoints.c.projection == "workitems")
                     .values(version=CODE_VERSIONS["workitems"] + 41))
        conn.execute(update(workitems).values(state="STALE", notification_count=0))
    feed(engine, lines[200:])
    result = runner.project(engine)
    assert result.rebuilt == tuple(CODE_VERSIONS)
    assert result.to_seq == 300
    with engine.connect() as conn:
        assert checkpoints(conn) == {name: (300, version) for name, version in CODE_VERSIONS.items()}
        assert not any(w["state"] == "STALE" for w in table_rows(conn, workitems))
        after = projection_snapshot(conn)
        assert verify(conn).ok
    runner.rebuild(engine)
    with engine.connect() as conn:
        assert projection_snapshot(conn) == after
    assert runner.project(engine).rebuilt == ()


def test_many_workitems_loaded_in_chunks(engine):
    """More keys than one IN (...) list holds: the incremental run loads state in chunks."""
    n = 1000
    feed(engine, [env(data("StatusChange", f"W{i:04d}", state="Invited", caps=["A", "B"], ref=i), i) for i in range(n)])
    runner.project(engine)
    feed(engine, [env(data("StatusChange", f"W{i:04d}", state="Processing", caps=["B"], ref=i), n + i)
                  for i in range(n)]
         + [env(data("Error", None, ref=i, code=409), 2 * n + i) for i in range(0, n, 2)])
    runner.project(engine)
    with engine.connect() as conn:
        incremental = projection_snapshot(conn)
    assert {w["state"] for w in incremental["workitems"]} == {"Processing"}
    assert len(incremental["workitem_transitions"]) == 2 * n
    assert sum(1 for c in incremental["capability_history"] if c["revoked_seq"] is not None) == n
    assert sum(1 for r in incremental["request_outcomes"] if r["outcome"] == "failed") == n // 2
    runner.rebuild(engine)
    with engine.connect() as conn:
        assert projection_snapshot(conn) == incremental
        assert verify(conn).ok


def test_long_log_spans_several_read_chunks(engine):
    """More rows than one read chunk (5000): intervals and outcomes cross chunk boundaries."""
    lines = list(simulate(11_000, agents=6, seed=11, noise_rate=0.01, duplicate_rate=0.02))
    feed(engine, lines[:4_000], file_name="a")
    runner.project(engine)
    feed(engine, lines[4_000:], file_name="b")
    runner.project(engine)
    with engine.connect() as conn:
        incremental = projection_snapshot(conn)
        assert len(log_rows(conn)) == 11_000
    runner.rebuild(engine)
    with engine.connect() as conn:
        assert projection_snapshot(conn) == incremental
        assert verify(conn).ok
