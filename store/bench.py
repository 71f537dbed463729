"""Benchmark: the store's import and rebuild rates against raw sqlite3 in the same run.

Baselines, measured on the same machine in the same run with the same simulated payloads:
- ``raw event_log``: ``sqlite3.executemany`` of finished rows (every column precomputed) into
  a table with event_log's exact schema (indexes, triggers), one transaction.  The store's
  import does that same database work plus reading, parsing, classifying and hashing each line,
  so the ratio is the cost of the store's own work.
- ``raw payloads``: ``sqlite3.executemany`` of (seq, payload) into a two-column table: the floor
  of "just write the bytes down".
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import select

from .db import open_store
from .ingest.files import import_file
from .projections import runner
from .schema import event_log
from .simulate import simulate


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _raw_insert(path: Path, ddl: list[str], insert: str, rows: list[tuple]) -> float:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    for statement in ddl:
        con.execute(statement)

    def work():
        con.execute("BEGIN IMMEDIATE")
        con.executemany(insert, rows)
        con.execute("COMMIT")
    seconds, _ = _timed(work)
    con.close()
    return seconds


def run(events: int, workdir: str | None = None) -> Iterator[str]:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        source = tmp / "stream.jsonl"
        source.write_text("".join(line + "\n" for line in simulate(events, agents=50, seed=42, noise_rate=0.002)))
        yield f"{events} simulated notifications ({source.stat().st_size / 1e6:.1f} MB of JSONL), SQLite {sqlite3.sqlite_version}"

        store_engine = open_store(str(tmp / "store.db"))
        import_s, result = _timed(lambda: import_file(store_engine, source))
        project_s, _ = _timed(lambda: runner.project(store_engine))
        rebuild_s, rebuilt = _timed(lambda: runner.rebuild(store_engine))

        # The baselines insert exactly the rows the store produced.
        with store_engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(select(event_log).order_by(event_log.c.seq))]
        store_engine.dispose()
        schema = sqlite3.connect(tmp / "store.db")
        ddl = [sql for (sql,) in schema.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'event_log' AND sql IS NOT NULL "
            "ORDER BY type = 'table' DESC")]
        schema.close()
        placeholders = ", ".join("?" * len(rows[0]))
        raw_log_s = _raw_insert(tmp / "raw_log.db", ddl, f"INSERT INTO event_log VALUES ({placeholders})", rows)
        raw_payload_s = _raw_insert(
            tmp / "raw_payload.db", ["CREATE TABLE payloads (seq INTEGER PRIMARY KEY, payload TEXT NOT NULL)"],
            "INSERT INTO payloads VALUES (?, ?)", [(r[0], r[9]) for r in rows])

        def rate(seconds: float, n: int = events) -> float:
            return n / seconds

        lines = [
            ("raw payloads  sqlite3.executemany (seq, payload)", raw_payload_s, events),
            ("raw event_log sqlite3.executemany (all columns)", raw_log_s, events),
            ("store import  (read, parse, classify, hash, append)", import_s, result.appended),
            ("store project (incremental, from empty)", project_s, events),
            ("store rebuild (all four projections)", rebuild_s, events),
        ]
        for label, seconds, n in lines:
            yield f"{label:55s} {rate(seconds, n):>10,.0f} rows/s  ({seconds:.2f} s)"
        yield f"import / raw event_log insert:  {raw_log_s / import_s:.2f}x   (target >= 0.6)"
        yield f"import / raw payload insert:    {raw_payload_s / import_s:.2f}x"
        yield f"rebuild rate: {rate(rebuild_s):,.0f} events/s (target >= 50,000; {rebuilt.applied} projectable)"
        yield f"measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
