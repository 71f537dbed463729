"""The analysts' views workitem_state_durations, request_outcome_summary and capability_timeline:
the same rows on SQLite and PostgreSQL, and their exact semantics.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
from helpers import UTC, bare, data, envelope, kind_of, load_store
from sqlalchemy import select

from store.db import open_store
from store.ingest.files import import_lines
from store.projections import runner
from store.schema import VIEWS
from store.simulate import simulate

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


