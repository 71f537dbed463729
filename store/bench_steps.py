"""The bench's steps (``store.bench``), each run in a process of its own: ``python -m
store.bench_steps`` reads the step's spec (JSON) on standard input and prints its result on one
line that starts with RESULT_PREFIX.

Rates are log rows per second (every line of the file is one row, duplicates and quarantined
lines included).  Peak RSS is the child's ``VmHWM`` (``/proc/self/status``), not
``getrusage().ru_maxrss``: Linux carries ru_maxrss across ``execve``, so a child would report at
least the RSS of the process that spawned it.  Elsewhere ru_maxrss is used.  A process the child
starts and waits for counts when larger (``RUSAGE_CHILDREN``).

Baselines: the same finished rows, inserted with no work of the store's around them.

- SQLite (default): ``sqlite3.executemany`` of the rows of the appended log, read back from the
  ``append`` store (every column as stored: seq, hashes, extracted columns), into the event_log
  table of a fresh store, created by the store's own migrations: the exact schema, with its
  indexes and triggers, with the store's connection settings (WAL, 64 MiB page cache), in one
  transaction, as ``append`` commits.  The rows are read back in chunks by seq; only the inserts
  are timed.  This is the database work ``append`` cannot avoid, so ``append / raw insert`` is
  the share of the time left after the store's own work (reading, parsing, classifying,
  duplicate detection, hashing, building rows in Python, counting): 1.0 would mean the store
  costs nothing on top of its inserts.
- PostgreSQL (``--db``): ``COPY event_log FROM STDIN`` through psycopg 3 (``cursor.copy``,
  ``write_row``, text format) of the same rows into the event_log table of a fresh store, one
  transaction: the fastest way a client can load finished rows into that table.  The rows are
  first spilled from the ``append`` database to a local file in chunks (not timed), and the time
  spent loading each chunk from it is left out of the COPY's time too: the server may go on
  working on rows already sent meanwhile, so if anything the baseline looks a little faster
  than it is and the ratios come out lower.

``raw-projections`` does the same (executemany, or COPY of each value's text) with the rows the
rebuild wrote into the four projection tables, read back from the ``append`` store after the
``rebuild`` step: the database work that ``project`` and ``rebuild`` cannot avoid.  Its rate is
counted in log rows, as the rebuild's, so ``rebuild / raw insert of the projection rows it
writes`` is the share of a rebuild's time that is the database writing its rows.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import random
import resource
import sqlite3
import statistics
import sys
import time
from pathlib import Path

from .errors import StoreError

RESULT_PREFIX = "BENCH-RESULT "  # the prefix of a child's result line on its stdout
CHUNK = 20_000  # rows per read of the log, and lines per write of the simulated stream
AUDIT_CALLS = 50  # timed calls each of history and state
AUDIT_WORKITEMS = 5  # workitems sampled for them
SQLITE_CACHE = "PRAGMA cache_size=-65536"  # as store.db sets on every connection


def _peak_rss_mb() -> float:
    """This process's peak RSS, or that of a process it started and waited for (verify's
    helper, forked) when larger."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    children_mb = children / (1 << 20) if sys.platform == "darwin" else children / 1024
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return max(int(line.split()[1]) / 1024, children_mb)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, children_mb)


def _step_simulate(spec: dict) -> dict:
    from .simulate import simulate

    start = time.perf_counter()
    chunk: list[str] = []
    with open(spec["path"], "w", encoding="utf-8") as out:
        for line in simulate(spec["events"], agents=50, seed=42, noise_rate=0.002):
            chunk.append(line)
            if len(chunk) >= CHUNK:
                out.write("\n".join(chunk) + "\n")
                chunk.clear()
        if chunk:
            out.write("\n".join(chunk) + "\n")
    return {"seconds": time.perf_counter() - start, "rows": spec["events"],
            "bytes": os.path.getsize(spec["path"])}


def _step_append(spec: dict, project: bool = False) -> dict:
    from .db import open_store
    from .ingest.files import import_file
    from .projections import runner

    engine = open_store(spec["url"])
    try:
        start = time.perf_counter()
        result = import_file(engine, Path(spec["path"]))
        appended = time.perf_counter() - start
        applied = runner.project(engine).applied if project else None
        seconds = time.perf_counter() - start
    finally:
        engine.dispose()
    return {"seconds": seconds, "rows": result.lines, "append_seconds": appended, "applied": applied,
            "duplicates": result.duplicates, "quarantined": result.quarantined}


def _step_project(spec: dict, rebuild: bool = False) -> dict:
    from .db import open_store
    from .projections import runner

    engine = open_store(spec["url"])
    try:
        start = time.perf_counter()
        result = (runner.rebuild if rebuild else runner.project)(engine)
        seconds = time.perf_counter() - start
    finally:
        engine.dispose()
    return {"seconds": seconds, "rows": result.to_seq - result.from_seq, "applied": result.applied,
            "errors": result.errors}


def _step_verify(spec: dict) -> dict:
    from .db import open_reader, snapshot
    from .verify import verify

    engine = open_reader(spec["url"])
    try:
        start = time.perf_counter()
        with snapshot(engine) as conn:
            report = verify(conn)
        seconds = time.perf_counter() - start
    finally:
        engine.dispose()
    return {"seconds": seconds, "rows": report.rows, "ok": report.ok}


def _step_verify_chain(spec: dict) -> dict:
    from .bulk import collections_postponed
    from .db import open_reader, snapshot
    from .verify import VerifyReport, verify_chain

    engine = open_reader(spec["url"])
    reports, seconds = [], []
    try:
        for columns in (False, True):
            reports.append(report := VerifyReport())
            with snapshot(engine) as conn, collections_postponed():  # as verify runs it
                start = time.perf_counter()
                verify_chain(conn, report, columns=columns)
                seconds.append(time.perf_counter() - start)
    finally:
        engine.dispose()
    return {"seconds": seconds[0], "rows": reports[0].rows, "columns_seconds": seconds[1],
            "ok": all(r.chain_break is None and not r.counts_mismatch and r.column_mismatch is None for r in reports)}


def _step_forget(spec: dict) -> dict:
    """forget --received-before with a cutoff after every row (a log all older than its
    retention): every userData value redacted, workitems refreshed; then the same again, which
    finds nothing to do (a daily cron run)."""
    from sqlalchemy import func, select

    from .db import open_store
    from .redaction import Selection, forget
    from .schema import event_log

    engine = open_store(spec["url"])
    try:
        with engine.connect() as conn:
            rows, last = conn.execute(select(func.count(), func.max(event_log.c.received_at))).one()
        selection = Selection(received_before=last + dt.timedelta(microseconds=1))
        seconds, redacted = [], []
        for _ in range(2):
            start = time.perf_counter()
            redacted.append(forget(engine, selection, "retention (bench)").redacted)
            seconds.append(time.perf_counter() - start)
    finally:
        engine.dispose()
    return {"seconds": seconds[0], "rows": rows, "redacted": redacted[0], "again_seconds": seconds[1],
            "again_redacted": redacted[1]}


def _step_audit(spec: dict) -> dict:
    from sqlalchemy import func, select

    from . import audit
    from .db import open_reader, snapshot
    from .schema import event_log

    engine = open_reader(spec["url"])
    try:
        with engine.connect() as conn:
            head = conn.execute(select(func.max(event_log.c.seq))).scalar_one() or 0
            seqs = sorted(random.Random(42).sample(range(1, head + 1), min(head, 200)))
            c = event_log.c
            rows = conn.execute(select(c.workitem_id, c.received_at)
                                .where(c.seq.in_(seqs), c.workitem_id.is_not(None),
                                       c.notification_type == "StatusChange", c.duplicate_of.is_(None),
                                       c.quarantine_reason.is_(None))
                                .order_by(c.seq)).all()
        picked: dict[str, dt.datetime] = {}  # workitem id -> the instant its state is asked for
        for workitem_id, received_at in rows:
            picked.setdefault(workitem_id, received_at)
            if len(picked) == AUDIT_WORKITEMS:
                break
        if not picked:
            raise StoreError("no workitem in the log to ask history and state about")
        ids = list(picked)

        def timed(call) -> list[float]:
            for workitem_id in ids:  # warm-up: connections, statement caches, pages
                call(workitem_id)
            times = []
            for i in range(AUDIT_CALLS):
                start = time.perf_counter()
                call(ids[i % len(ids)])
                times.append((time.perf_counter() - start) * 1000)
            return times

        trail_rows: list[int] = []

        def history(workitem_id):
            with snapshot(engine) as conn:
                trail_rows.append(len(audit.history(conn, workitem_id)))

        def state(workitem_id):
            with snapshot(engine) as conn:
                audit.state(conn, workitem_id, as_of=picked[workitem_id])

        history_ms, state_ms = timed(history), timed(state)
    finally:
        engine.dispose()
    return {"history_ms": history_ms, "state_ms": state_ms, "workitems": len(ids),
            "trail_rows": statistics.mean(trail_rows)}


def _table_pages(url: str, table: str):
    """(column names, the rows of ``url``'s ``table`` as the driver reads them, in lists): what
    the baselines load (not timed).  event_log is read in pages by seq; a projection table
    (read after a rebuild: its rows, in no particular order) through a streaming cursor, on
    PostgreSQL as text (COPY's input: the driver would read jsonb as Python values)."""
    from sqlalchemy import select

    from .db import open_engine
    from .reading import pages
    from .schema import metadata

    columns = [c.name for c in metadata.tables[table].columns]  # (event_log: seq first, the pages' key)

    def read():
        engine = open_engine(url, readonly=True)
        try:
            with engine.connect() as conn:
                if table == "event_log":
                    yield from pages(conn, select(*metadata.tables[table].columns), size=CHUNK, raw=True)
                    return
                cast = "::text" if conn.dialect.name == "postgresql" else ""
                result = conn.execution_options(stream_results=True).exec_driver_sql(
                    f"SELECT {', '.join(c + cast for c in columns)} FROM {table}")
                while rows := result.fetchmany(CHUNK):
                    yield rows
        finally:
            engine.dispose()
    return columns, read()


def _step_raw_sqlite(spec: dict) -> dict:
    from .db import open_store

    open_store(spec["url"]).dispose()  # the schema, by the store's own migrations
    target = sqlite3.connect(spec["url"].removeprefix("sqlite:///"), isolation_level=None)
    seconds, rows = 0.0, 0
    try:
        target.execute(SQLITE_CACHE)
        start = time.perf_counter()
        target.execute("BEGIN IMMEDIATE")  # (as the store's write transaction: locks.py)
        seconds += time.perf_counter() - start
        for table in spec["tables"]:
            columns, chunks = _table_pages(spec["source_url"], table)
            insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            try:
                for chunk in chunks:
                    start = time.perf_counter()
                    target.executemany(insert, chunk)
                    seconds += time.perf_counter() - start
                    rows += len(chunk)
            finally:
                chunks.close()
        start = time.perf_counter()
        target.execute("COMMIT")
        seconds += time.perf_counter() - start
    finally:
        target.close()
    return {"seconds": seconds, "rows": rows}


def _libpq(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _load(spilled) -> list | None:
    try:
        return pickle.load(spilled)
    except EOFError:
        return None


def _step_raw_postgresql(spec: dict) -> dict:
    import psycopg

    from .db import open_store

    open_store(spec["url"]).dispose()  # the schema, by the store's own migrations
    spills: list[tuple[str, list[str], Path]] = []
    seconds, rows = 0.0, 0
    try:
        for table in spec["tables"]:
            columns, pages = _table_pages(spec["source_url"], table)
            spills.append((table, columns, spill := Path(f"{spec['spill']}.{table}")))
            with spill.open("wb") as out:
                for page in pages:
                    pickle.dump(page, out, protocol=pickle.HIGHEST_PROTOCOL)
        with psycopg.connect(_libpq(spec["url"])) as target:
            cur = target.cursor()
            for table, columns, spill in spills:
                with spill.open("rb") as spilled:
                    start = time.perf_counter()
                    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                        seconds += time.perf_counter() - start
                        while (chunk := _load(spilled)) is not None:  # loading a chunk is not timed
                            start = time.perf_counter()
                            for row in chunk:
                                copy.write_row(row)
                            seconds += time.perf_counter() - start
                            rows += len(chunk)
                        start = time.perf_counter()  # the end of the COPY: the server's last rows
                    seconds += time.perf_counter() - start
            start = time.perf_counter()
            target.commit()
            seconds += time.perf_counter() - start
    finally:
        for _, _, spill in spills:
            spill.unlink(missing_ok=True)
    return {"seconds": seconds, "rows": rows}


_CHILD_STEPS = {
    "simulate": _step_simulate,
    "append": _step_append,
    "import": lambda spec: _step_append(spec, project=True),
    "project": _step_project,
    "rebuild": lambda spec: _step_project(spec, rebuild=True),
    "verify-chain": _step_verify_chain,
    "verify": _step_verify,
    "audit": _step_audit,
    "forget": _step_forget,
    "raw-sqlite": _step_raw_sqlite,
    "raw-postgresql": _step_raw_postgresql,
}


def main() -> int:
    """Run the step of the spec on standard input; its result, with the peak RSS, on standard
    output (this process's output is read by ``bench._child``, never shown as it is)."""
    spec = json.loads(sys.stdin.read())
    result = _CHILD_STEPS[spec["step"]](spec)
    result["rss_mb"] = _peak_rss_mb()
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
