"""Per-key lookups walk an index on both engines: a plan regression fails here, not in a
user's week-long import.

An import (with duplicates), an incremental ``project``, ``history`` and ``state`` run on a
store with some history, with every SELECT they send recorded; each is then EXPLAINed.  SQLite
must not SCAN a table (only SEARCH it, by an index or the rowid; the one SCAN allowed reads a
batch's keys from a JSON array); PostgreSQL, with sequential scans made unattractive (the tables
are small), must not need one.
"""

from __future__ import annotations

import contextlib

from helpers import feed
from sqlalchemy import event, text

from store import audit
from store.projections import runner
from store.simulate import simulate


@contextlib.contextmanager
def recorded_selects(engine):
    statements: list[tuple[str, object]] = []

    def record(_conn, _cursor, statement, parameters, _context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and not executemany:
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


# SQLite's plan step reading a batch's keys, given as a JSON array (duplicates.py): not a table.
KEYS_SCAN = "SCAN k VIRTUAL TABLE"

# Read whole on purpose: one row per projection; normally empty.
WHOLE = ("projection_checkpoints", "projection_errors")


def _stops_at_limit(statement: str) -> bool:
    """SQLite says SCAN for the log's head (rowid order from the end, LIMIT 1): one row read."""
    return "ORDER BY event_log.seq DESC" in statement and "LIMIT" in statement


def _scans(engine, statements) -> list[str]:
    bad = []
    statements = [(sql, params) for sql, params in statements if not any(f"FROM {t}" in sql for t in WHOLE)]
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SET enable_seqscan = off")
        for statement, parameters in statements:
            if engine.dialect.name == "sqlite":
                plan = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)]
                bad += [f"{step}  <-  {statement[:200]}" for step in plan
                        if step.startswith("SCAN ") and not step.startswith(KEYS_SCAN)
                        and not _stops_at_limit(statement)]
            else:
                plan = [row[0] for row in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)]
                bad += [f"{step.strip()}  <-  {statement[:200]}" for step in plan if "Seq Scan" in step]
    return bad


def test_import_projection_history_and_state_walk_indexes(engine):
    lines = list(simulate(3000, agents=5))
    feed(engine, lines[:2000])
    runner.project(engine)
    feed(engine, lines[2000:], file_name="more")
    with engine.connect() as conn:
        workitem = conn.execute(text("SELECT workitem_id FROM workitems ORDER BY last_seq DESC LIMIT 1")).scalar_one()
    with recorded_selects(engine) as statements:
        feed(engine, lines[2000:] + lines[:50], file_name="again")  # duplicates among them
        runner.project(engine)
        with engine.connect() as conn:
            assert audit.history(conn, workitem)
            assert audit.state(conn, workitem, upto_seq=2500) is not None
    assert len(statements) > 5
    assert _scans(engine, statements) == []


def _lookup_plans(engine, statements, marks: tuple[str, str]) -> dict[str, list[list[str]]]:
    """The plans of the duplicate lookups among ``statements`` (those holding one of ``marks``:
    the keyed lookup's, the payload lookup's), by mark."""
    plans: dict[str, list[list[str]]] = {mark: [] for mark in marks}
    with engine.connect() as conn:
        for statement, parameters in statements:
            for mark in marks:
                if mark in statement:
                    explain = "EXPLAIN QUERY PLAN" if engine.dialect.name == "sqlite" else "EXPLAIN"
                    plans[mark].append([row[-1] if engine.dialect.name == "sqlite" else row[0].strip()
                                        for row in conn.exec_driver_sql(f"{explain} {statement}", parameters)])
    return plans


def test_duplicate_lookups_probe_the_index_key_by_key(engine):
    """Issue 9: the duplicate lookups of an append are an index probe per key (source and
    message id; payload digest for messages without id), whatever the log's size, before and
    after ANALYZE (an import runs in one transaction, with the statistics of before it): SQLite
    SEARCHes by both columns; PostgreSQL, left to choose, runs a nested loop of index scans,
    never a scan of the log nor of all of one source's rows.  Both take the batch's keys as one
    JSON array."""
    keyed = list(simulate(3000, agents=5, seed=11))
    unkeyed = list(simulate(1000, agents=5, seed=12, fmt="bare"))
    feed(engine, keyed + unkeyed)
    sqlite = engine.dialect.name == "sqlite"
    marks = (("event_log.message_id IN (SELECT", "payload_sha256 IN (SELECT") if sqlite
             else ("json_to_recordset", "json_array_elements_text"))
    with recorded_selects(engine) as statements:
        feed(engine, keyed[-500:] + unkeyed[-500:] + keyed[:10], file_name="again")
    for analyzed in (False, True):
        if analyzed:
            with engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE event_log")
        plans = _lookup_plans(engine, statements, marks)
        keyed_plans, payload_plans = plans[marks[0]], plans[marks[1]]
        assert keyed_plans and payload_plans, statements
        if sqlite:
            # One SEARCH of the log's index per element of the array.
            keys_in = ["LIST SUBQUERY 1", f"{KEYS_SCAN} INDEX 1:"]
            assert all(plan == ["SEARCH event_log USING INDEX ix_event_log_source_message_id "
                                "(source=? AND message_id=?)", *keys_in, "USE TEMP B-TREE FOR GROUP BY"]
                       for plan in keyed_plans), keyed_plans
            assert all(plan == ["SEARCH event_log USING INDEX ix_event_log_payload_sha256 (payload_sha256=?)",
                                *keys_in] for plan in payload_plans), payload_plans
            continue
        for plan in keyed_plans:
            assert plan[0].startswith("Nested Loop"), plan
            assert any(step.startswith("->  Index Scan using ix_event_log_source_message_id on event_log")
                       for step in plan), plan
            assert "Index Cond: ((source = k.source) AND (message_id = k.message_id))" in plan, plan
        for plan in payload_plans:
            assert plan[0].startswith("Nested Loop"), plan
            assert any(step.startswith("->  Index Scan using ix_event_log_payload_sha256 on event_log")
                       for step in plan), plan
            assert "Index Cond: ((payload_sha256)::text = k.digest)" in plan, plan
        assert not any("Seq Scan on event_log" in step or "Bitmap" in step
                       for plan in keyed_plans + payload_plans for step in plan), plans
