"""Benchmark: the store's rates, memory and audit latency, against raw inserts measured in the same run.

``workitem-store bench --events N`` simulates N notifications (``store.simulate``, 50 agents, seed
42, a little noise, so that duplicates and quarantined lines are part of the load) into a JSONL
file, then runs each step in a process of its own, so that each step's peak RSS is its own:

- ``append``: ``import --no-project`` of the file into a fresh store: read, parse, classify, hash
  chain and insert every line into event_log, in one transaction (``ingest.files.import_file``).
- ``import``: ``import`` of the same file into another fresh store: the append, then the
  projections brought up to date (``runner.project``): what a user waits for.
- ``project``: the incremental ``project`` from empty over the log that ``append`` left
  (transactions of ``runner.TRANSACTION_EVENTS`` events, checkpointed).
- ``rebuild``: ``rebuild``: every projection recomputed from seq 1 in one transaction.
- ``verify-chain``: the chain part of ``verify`` alone (``verify.verify_chain`` without its
  columns: payload hashes, links, the kept row counts) over the log ``append`` left, in one
  read-only snapshot; then, in another and shown on the same line, the chain with the check of
  the extracted columns, as ``verify`` runs them.
- ``verify``: full ``verify`` (hash chain, extracted columns, row counts, every projection
  against a rebuild) in one read-only snapshot, as the command does.
- ``audit``: ``history`` and ``state --as-of`` (``store.audit``) of workitems sampled from the
  log: median and maximum latency over 50 calls each, after a warm-up, each call a read-only
  snapshot as the commands open it (process start-up and printing are not counted).
- ``raw``, ``raw-projections``, ``raw-chain``: the baselines (below): the log's rows, and the
  projection rows the rebuild wrote, inserted with no store code; the chain checked with no
  store code.

Rates are log rows per second (every line of the file is one row, duplicates and quarantined
lines included).  How each step runs and measures: ``bench_steps``; the baselines:
``bench_baselines``.

On PostgreSQL the bench never touches the database of the URL beyond connecting to it: it
creates throwaway databases next to it (``CREATE DATABASE``, the role needs CREATEDB) and drops
them at the end, whatever happens.  SQLite files, the JSONL file and the spill live in a
temporary directory inside ``--workdir``, removed at the end.

The parent process only starts children and prints their lines; no step holds the stream or the
log in memory: the simulated stream is written in chunks, rows are read in chunks by seq.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from . import bench_targets
from .bench_steps import RESULT_PREFIX
from .errors import StoreError
from .projections import PROJECTIONS

STEPS = ("append", "import", "project", "rebuild", "verify-chain", "verify", "audit", "raw", "raw-projections",
         "raw-chain", "forget")
# What each step needs run before it (on the same store): the log of ``append``, projections.
NEEDS = {"project": ("append",), "rebuild": ("append",), "verify-chain": ("append",),
         "verify": ("append", "project"), "audit": ("append",), "raw": ("append",),
         "raw-projections": ("append", "rebuild"), "raw-chain": ("append",), "forget": ("append", "project")}
# The order steps run in: the baseline right after the log it copies, then the import, whose
# ratio is then printed early; projections and what reads them last.
ORDER = ("append", "raw", "import", "project", "rebuild", "raw-projections", "verify-chain", "raw-chain", "verify",
         "audit", "forget")  # (forget changes the log: last)
INSERT_BASELINES = ("raw", "raw-projections")
BASELINES = (*INSERT_BASELINES, "raw-chain")
STEP_HELP = {
    "append": "import --no-project into a fresh store (read, parse, classify, hash, insert)",
    "import": "import into a fresh store (append, then project)",
    "project": "incremental project from empty over the appended log",
    "rebuild": "rebuild: every projection from seq 1, one transaction",
    "verify-chain": "verify's chain part: payload hashes, links, counts",
    "verify": "full verify: chain, columns, counts, projections against a rebuild",
    "audit": "history and state --as-of of sampled workitems",
    "raw": "baseline: the finished rows inserted raw",
    "raw-projections": "baseline: the projection rows of the rebuild inserted raw",
    "raw-chain": "baseline: the chain checked with no store code (payload and link SHA-256, one process)",
    "forget": "forget --received-before (retention) over the whole log, projected",
}

# The goals.
REBUILD_RATE = 50_000
IMPORT_RATE_SQLITE = 25_000
APPEND_RATIO_SQLITE = 0.45
IMPORT_RATIO_POSTGRESQL = 0.4
RSS_MB = 500
AUDIT_MS = 5.0
VERIFY_CHAIN_RATE_SQLITE = 300_000
VERIFY_RATE_SQLITE = 50_000
FORGET_RATE_SQLITE = 20_000

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_VERIFY_FAILED = "   VERIFY FAILED: run `workitem-store verify` on such a store"


def parse_steps(value: str | None) -> tuple[str, ...]:
    """``--steps`` (comma-separated names, or None for all) -> the steps to run, in run order,
    with the steps they need added."""
    if not value:
        return ORDER
    wanted = {s.strip() for s in value.split(",") if s.strip()}
    unknown = sorted(wanted - set(STEPS))
    if unknown or not wanted:
        raise ValueError(f"unknown step(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(STEPS)}")
    todo = set()
    pending = list(wanted)
    while pending:
        step = pending.pop()
        if step not in todo:
            todo.add(step)
            pending.extend(NEEDS.get(step, ()))
    return tuple(s for s in ORDER if s in todo)


# -- running a step in a child process ----------------------------------------------------------

def _child(spec: dict) -> dict:
    """Run one step in a process of its own; its result, with its peak RSS."""
    # The package root as working directory: ``-m store.bench_steps`` imports this very package,
    # never a ``store`` directory that happens to be where the user runs the bench.
    proc = subprocess.run([sys.executable, "-m", "store.bench_steps"], input=json.dumps(spec), text=True,
                          capture_output=True, cwd=_PACKAGE_ROOT, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    # One line (the CLI prints messages on one line): where it failed, and the exception.
    lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
    where = next((line for line in reversed(lines) if line.startswith('File "')), "")
    raise StoreError(f"bench step {spec['step']} failed (exit status {proc.returncode}): "
                     f"{lines[-1] if lines else 'no output'}" + (f" ({where})" if where else ""))


# -- the run ------------------------------------------------------------------------------------

def _workdir(workdir: str | None) -> str | None:
    if workdir is None:
        return None
    path = Path(workdir)
    if not path.is_dir():
        if not path.parent.is_dir():
            raise StoreError(f"workdir {workdir}: its parent directory {path.parent} does not exist")
        try:
            path.mkdir()
        except FileExistsError:
            raise StoreError(f"workdir {workdir} exists and is not a directory") from None
        except OSError as exc:
            raise StoreError(f"cannot create workdir {workdir}: {exc.strerror}") from exc
    return str(path)


def _rate(result: dict) -> float:
    return result["rows"] / result["seconds"] if result["seconds"] > 0 else float("inf")


def _step_line(name: str, result: dict, note: str = "") -> str:
    return (f"{name:15s} {_rate(result):>10,.0f} events/s {result['seconds']:>8.3f} s   "
            f"peak RSS {result['rss_mb']:>5.0f} MB   {STEP_HELP[name]}{note}")


def _goal(label: str, measured: str, ok: bool | None) -> str:
    verdict = "n/a" if ok is None else ("ok" if ok else "MISSED")
    return f"  {label:44s} {measured:38s} {verdict}"


def run(events: int, workdir: str | None = None, db: str | None = None,
        steps: tuple[str, ...] = ORDER) -> Iterator[str]:
    """Run the bench; yields each line of the report as soon as it is known."""
    workdir = _workdir(workdir)
    # SIGTERM (kill, a CI timeout) ends the run as Ctrl-C does: through the clean-up below, so
    # that no throwaway database or file is left (the running child is killed by subprocess.run).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        with tempfile.TemporaryDirectory(prefix="wis-bench-", dir=workdir) as tmp_name:
            tmp = Path(tmp_name)
            target = bench_targets.target(db, tmp)
            try:
                yield from _run(events, tmp, target, steps)
            finally:
                target.close()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)


def _run(events: int, tmp: Path, target, steps: tuple[str, ...]) -> Iterator[str]:
    stream = tmp / "stream.jsonl"
    sim = _child({"step": "simulate", "path": str(stream), "events": events})
    yield (f"{events:,} simulated notifications ({sim['bytes'] / 1e6:,.1f} MB of JSONL, {sim['seconds']:.1f} s); "
           f"{target.describe()}; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    yield "steps, each in a process of its own (rates: log rows per second; every line is one row):"
    results: dict[str, dict] = {}
    log_url = None
    raw_name = "raw insert" if target.backend == "sqlite" else "raw COPY"
    for step in steps:
        if step == "append":
            log_url = target.create("log")
            results[step] = r = _child({"step": "append", "url": log_url, "path": str(stream)})
            yield _step_line(step, r, f" ({r['duplicates']:,} duplicates, {r['quarantined']:,} quarantined)")
        elif step == "import":
            url = target.create("import")
            results[step] = r = _child({"step": "import", "url": url, "path": str(stream)})
            target.drop("import")
            yield _step_line(step, r, f" (append {r['append_seconds']:.2f} s + project "
                                      f"{r['seconds'] - r['append_seconds']:.2f} s)")
        elif step in ("project", "rebuild"):
            results[step] = r = _child({"step": step, "url": log_url})
            yield _step_line(step, r, f" ({r['applied']:,} projectable events, {r['errors']} projection errors)")
        elif step == "verify-chain":
            results[step] = r = _child({"step": "verify-chain", "url": log_url})
            columns = {"rows": r["rows"], "seconds": r["columns_seconds"]}
            yield _step_line(step, r, f" (with columns {_rate(columns):,.0f} events/s, {r['columns_seconds']:.3f} s)"
                                      + ("" if r["ok"] else _VERIFY_FAILED))
        elif step == "verify":
            results[step] = r = _child({"step": "verify", "url": log_url})
            yield _step_line(step, r, "" if r["ok"] else _VERIFY_FAILED)
        elif step == "audit":
            results[step] = r = _child({"step": "audit", "url": log_url})
            for name, times in (("history", r["history_ms"]), ("state", r["state_ms"])):
                yield (f"{'audit':15s} {name + (' --as-of' if name == 'state' else ''):15s} median "
                       f"{statistics.median(times):6.2f} ms, max {max(times):6.2f} ms over {len(times)} calls "
                       f"({r['workitems']} workitems, {r['trail_rows']:.0f} log rows each on average)   "
                       f"peak RSS {r['rss_mb']:.0f} MB")
        elif step == "forget":
            results[step] = r = _child({"step": "forget", "url": log_url})
            yield _step_line(step, r, f" ({r['redacted']:,} rows redacted, {r['redacted'] / r['seconds']:,.0f}/s; "
                                      f"run again: {r['rows'] / r['again_seconds']:,.0f} events/s, nothing to do)")
        elif step == "raw-chain":
            results[step] = r = _child({"step": "raw-chain", "url": log_url})
            yield _step_line(step, r, "" if r["ok"] else "   A HASH DIFFERS")
        elif step in INSERT_BASELINES:
            name = step.replace("-", "_")
            url = target.create(name)
            tables = ["event_log"] if step == "raw" else [cls.table.name for cls in PROJECTIONS]
            results[step] = r = _child({"step": f"raw-{target.backend}", "url": url, "source_url": log_url,
                                        "tables": tables, "spill": str(tmp / "rows.spill")})
            target.drop(name)
            what = "the appended rows" if step == "raw" else f"the rows the rebuild wrote ({r['rows']:,})"
            r["rows"] = results["append"]["rows"]  # (a rate of log rows, as every step's)
            how = ("sqlite3.executemany" if target.backend == "sqlite" else "psycopg COPY FROM STDIN") + \
                f" of {what} into {', '.join(tables)}, one transaction"
            yield (f"{step:15s} {_rate(r):>10,.0f} events/s {r['seconds']:>8.3f} s   "
                   f"peak RSS {r['rss_mb']:>5.0f} MB   baseline: {how}")
    target.drop("log")

    ratios = {}
    if any(step in results for step in BASELINES):
        yield "ratios to the baselines of this run (the same rows, or the same hashing, with no store code):"
    if "raw" in results:
        for step in ("append", "import"):
            if step in results:
                ratios[step] = _rate(results[step]) / _rate(results["raw"])
                aim = (APPEND_RATIO_SQLITE if target.backend == "sqlite" else IMPORT_RATIO_POSTGRESQL) \
                    if step == "append" else None
                prefix = "PostgreSQL " if target.backend == "postgresql" else ""
                yield (f"  {prefix}{step} / {raw_name}: {ratios[step]:.2f}x"
                       + (f" (target >= {aim})" if aim is not None else ""))
    if "raw-projections" in results:
        for step in ("project", "rebuild"):
            if step in results:
                yield f"  {step} / {raw_name} of the projection rows it writes: " \
                      f"{_rate(results[step]) / _rate(results['raw-projections']):.2f}x"
        if "raw" in results:
            ceiling = 1 / (1 / _rate(results["raw"]) + 1 / _rate(results["raw-projections"]))
            yield f"  {raw_name} of the log rows and of their projection rows, one after the other " \
                  f"(what import cannot beat here): {ceiling:,.0f} events/s"
    if "raw-chain" in results and "verify-chain" in results:
        yield f"  verify-chain / the chain checked with no store code: " \
              f"{_rate(results['verify-chain']) / _rate(results['raw-chain']):.2f}x"

    yield "goals:"
    yield from _goals(results, ratios, target.backend)
    if any(step in results and not results[step]["ok"] for step in ("verify-chain", "verify")):
        yield "verify FAILED on the benchmark's store: the rates above are of a store that is not consistent"
    yield f"measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"


def _goals(results: dict, ratios: dict, backend: str) -> Iterator[str]:
    """The issue's goals, each measured (ok or MISSED), or n/a with why."""
    def rate(step: str, goal: int) -> tuple[str, bool]:
        value = _rate(results[step])
        return f"{value:,.0f} events/s", value >= goal

    def append_ratio(goal: float) -> tuple[str, bool]:
        return f"{ratios['append']:.2f}x", ratios["append"] >= goal

    def peak_rss() -> tuple[str, bool]:
        steps = {k: v for k, v in results.items() if k not in BASELINES}
        worst = max(steps, key=lambda k: steps[k]["rss_mb"])
        return f"max {steps[worst]['rss_mb']:.0f} MB ({worst})", steps[worst]["rss_mb"] < RSS_MB

    def audit() -> tuple[str, bool]:
        medians = {name: statistics.median(results["audit"][f"{name}_ms"]) for name in ("history", "state")}
        worst = max(medians, key=lambda name: medians[name])
        return f"{medians[worst]:.2f} ms ({worst})", medians[worst] < AUDIT_MS

    # (label, the engine it is about or None, measured in this run, measure).  The issue's
    # "PostgreSQL import >= 0.4 of a raw COPY of the same rows" is the import of the rows into the
    # log (import --no-project, the append step), which is what COPY does too.
    goals = [
        (f"rebuild >= {REBUILD_RATE:,} events/s", None, "rebuild" in results, lambda: rate("rebuild", REBUILD_RATE)),
        (f"append >= {APPEND_RATIO_SQLITE} of raw insert (SQLite)", "sqlite", "append" in ratios,
         lambda: append_ratio(APPEND_RATIO_SQLITE)),
        (f"import >= {IMPORT_RATE_SQLITE:,} events/s (SQLite)", "sqlite", "import" in results,
         lambda: rate("import", IMPORT_RATE_SQLITE)),
        (f"peak RSS of each step < {RSS_MB} MB", None, any(k not in BASELINES for k in results), peak_rss),
        (f"history, state --as-of < {AUDIT_MS:g} ms (median)", None, "audit" in results, audit),
        (f"verify chain >= {VERIFY_CHAIN_RATE_SQLITE:,} events/s (SQLite)", "sqlite", "verify-chain" in results,
         lambda: rate("verify-chain", VERIFY_CHAIN_RATE_SQLITE)),
        (f"full verify >= {VERIFY_RATE_SQLITE:,} events/s (SQLite)", "sqlite", "verify" in results,
         lambda: rate("verify", VERIFY_RATE_SQLITE)),
        (f"forget >= {FORGET_RATE_SQLITE:,} rows/s (SQLite)", "sqlite", "forget" in results,
         lambda: rate("forget", FORGET_RATE_SQLITE)),
        (f"append >= {IMPORT_RATIO_POSTGRESQL} of raw COPY (PostgreSQL)", "postgresql", "append" in ratios,
         lambda: append_ratio(IMPORT_RATIO_POSTGRESQL)),
    ]
    other = "not this run: PostgreSQL only (--db)" if backend == "sqlite" else "not this run: SQLite only (no --db)"
    for label, engine, measured, measure in goals:
        if engine not in (None, backend):
            yield _goal(label, other, None)
        elif not measured:
            yield _goal(label, "not measured (step not run)", None)
        else:
            yield _goal(label, *measure())
