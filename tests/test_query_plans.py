"""Per-key lookups walk an index on both engines: a plan regression fails here, not in a
user's week-long import.

An import (with duplicates), an incremental ``project``, ``history`` and ``state`` run on a
store with some history, with every SELECT they send recorded; each is then EXPLAINed.  SQLite must not SCAN a table (only SEARCH it, by
an index or the rowid); PostgreSQL, with sequential scans made unattractive (the tables are
small), must not need one.
"""

from __future__ import annotations

import contextlib

from sqlalchemy import event, text

from helpers import feed
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
                        if step.startswith("SCAN ") and not _stops_at_limit(statement)]
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
