"""The bench's steps (``store.bench``), each run in a process of its own: ``python -m
store.bench_steps`` reads the step's spec (JSON) on standard input and prints its result on one
line that starts with RESULT_PREFIX.

Rates are log rows per second (every line of the file is one row, duplicates and quarantined
lines included).  Peak RSS is the child's ``VmHWM`` (``/proc/self/status``), not
``getrusage().ru_maxrss``: Linux carries ru_maxrss across ``execve``, so a child would report at
least the RSS of the process that spawned it.  Elsewhere ru_maxrss is used.  A process the child
starts and waits for counts when larger (``RUSAGE_CHILDREN``).

The baselines' steps are in ``store.bench_baselines``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

from . import bench_baselines
from .errors import StoreError

RESULT_PREFIX = "BENCH-RESULT "  # the prefix of a child's result line on its stdout
CHUNK = 20_000  # lines per write of the simulated stream
AUDIT_CALLS = 50  # timed calls each of history and state
AUDIT_WORKITEMS = 5  # workitems sampled for them


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
    "raw-sqlite": bench_baselines.step_raw_sqlite,
    "raw-postgresql": bench_baselines.step_raw_postgresql,
    "raw-chain": bench_baselines.step_raw_chain,
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
