"""Several writers at once: gapless seq in commit order, a valid chain, projections equal to a rebuild."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import bare, checkpoints, data, feed, projection_snapshot, table_rows
from sqlalchemy import func, select, text

from store import log
from store.db import open_store, write_transaction
from store.notifications import parse_line
from store.projections import PROJECTIONS, runner
from store.schema import event_log, imported_files
from store.simulate import simulate
from store.verify import verify

CLI = Path(sys.executable).with_name("workitem-store")
WRITERS = 4
FILES_PER_WRITER = 3


def _write_files(tmp_path: Path) -> dict[str, int]:
    """The input files, name -> line count: Bayeux files (source file:<name>) and envelope files."""
    counts = {}
    for w in range(WRITERS):
        for f in range(FILES_PER_WRITER):
            name = f"w{w}-f{f}.jsonl"
            fmt = "bayeux" if (w + f) % 2 else "envelope"
            lines = list(simulate(60 + 10 * f, agents=3, seed=100 * w + f, fmt=fmt,
                                  noise_rate=0.05, duplicate_rate=0.05))
            (tmp_path / name).write_text("\n".join(lines) + "\n")
            counts[name] = len(lines)
    return counts


def _worker(url: str, paths: list[str], barrier) -> None:
    """One writer process: wait for the others, then import its files, projecting in between."""
    from store.db import open_store
    from store.ingest.files import import_file
    from store.projections import runner

    barrier.wait(timeout=60)
    engine = open_store(url)  # every worker starts on an empty database: schema creation races too
    for path in paths:
        import_file(engine, Path(path))
        runner.project(engine)
    engine.dispose()


def _check_store(url: str, counts: dict[str, int]) -> None:
    engine = open_store(url)
    total = sum(counts.values())
    with engine.connect() as conn:
        seqs = conn.execute(select(event_log.c.seq).order_by(event_log.c.seq)).scalars().all()
        assert seqs == list(range(1, total + 1))
        files = table_rows(conn, imported_files)
        assert sorted(f["file_name"] for f in files) == sorted(counts)
        for f in files:
            # each file went in whole, in one transaction: its rows are one contiguous seq range
            assert f["rows"] == counts[f["file_name"]] == f["last_seq"] - f["first_seq"] + 1
            if (int(f["file_name"][1]) + int(f["file_name"][4])) % 2:  # Bayeux file: its own source
                sources = conn.execute(select(func.distinct(event_log.c.source)).where(
                    event_log.c.seq.between(f["first_seq"], f["last_seq"]))).scalars().all()
                assert sources == [f"file:{f['file_name']}"]
        assert checkpoints(conn) == {cls.name: (total, cls.version) for cls in PROJECTIONS}
        report = verify(conn)
        assert report.ok, (report.chain_break, report.differences)
        assert report.rows == total
        projected = projection_snapshot(conn)
    assert all(projected.values())
    runner.rebuild(engine)
    with engine.connect() as conn:
        assert projection_snapshot(conn) == projected
    engine.dispose()


def test_writer_processes_importing_at_once(db_url, tmp_path):
    counts = _write_files(tmp_path)
    names = sorted(counts)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_worker, args=(db_url, [str(tmp_path / n) for n in names[w::WRITERS]], barrier))
             for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    _check_store(db_url, counts)


def test_cli_imports_running_at_once(db_url, tmp_path):
    counts = _write_files(tmp_path)
    names = sorted(counts)
    env = {**os.environ, "WORKITEM_STORE_URL": db_url}
    procs = [subprocess.Popen([str(CLI), "import", *[str(tmp_path / n) for n in names[w::WRITERS]]],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(WRITERS)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * WRITERS, outputs
    assert all("appended" in out for out, _ in outputs)
    subprocess.run([str(CLI), "project"], env=env, check=True, capture_output=True)
    _check_store(db_url, counts)


# -- a reader never sees seq N+1 committed while N is in flight -----------------------------------

def _wait_until(condition, what: str, timeout: float = 30.0) -> None:
    """Poll a database condition (not a sleep standing in for synchronisation)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


class Appender(threading.Thread):
    """Appends one notification in its own write transaction; optionally holds it open."""

    def __init__(self, engine, wid: str, hold: threading.Event | None = None):
        super().__init__(daemon=True)
        self.engine, self.wid, self.hold = engine, wid, hold
        self.started = threading.Event()  # set before the transaction begins
        self.appending = threading.Event()  # set once inside the transaction, before append
        self.appended = threading.Event()  # set once append returned, transaction still open
        self.pid = None
        self.result = None
        self.error = None

    def run(self):
        self.started.set()
        try:
            with write_transaction(self.engine) as conn:
                if conn.dialect.name == "postgresql":
                    self.pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                self.appending.set()
                self.result = log.append(conn, [parse_line(bare(data("StatusChange", self.wid, state="Invited")))],
                                         source="s", received_at=dt.datetime.now(dt.UTC))
                self.appended.set()
                if self.hold is not None:
                    assert self.hold.wait(timeout=60), "never released"
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _committed(engine) -> list[int]:
    with engine.connect() as conn:
        return conn.execute(select(event_log.c.seq).order_by(event_log.c.seq)).scalars().all()


@pytest.mark.postgres
def test_second_appender_waits_for_the_first_on_postgresql(pg_url):
    engine = open_store(pg_url)
    feed(engine, [bare(data("StatusChange", f"P{i}")) for i in range(3)])
    release = threading.Event()
    first = Appender(engine, "A", hold=release)
    first.start()
    assert first.appended.wait(timeout=30)  # seq 4 allocated, not committed, table lock held
    second = Appender(engine, "B")
    second.start()
    assert second.appending.wait(timeout=30)

    def second_is_waiting_on_event_log():
        with engine.connect() as conn:
            return conn.execute(text(
                "SELECT count(*) FROM pg_locks WHERE pid = :pid AND NOT granted AND relation = 'event_log'::regclass"
            ), {"pid": second.pid}).scalar_one() == 1

    _wait_until(second_is_waiting_on_event_log, "the second appender waits for the event_log lock")
    # Readers are not blocked, and see neither the in-flight seq 4 nor anything after it.
    assert _committed(engine) == [1, 2, 3]
    assert not second.appended.is_set() and second.result is None
    _release_and_check_both_committed_in_order(engine, release, first, second)
    engine.dispose()


def _release_and_check_both_committed_in_order(engine, release, first, second) -> None:
    release.set()
    first.join(timeout=90)
    second.join(timeout=90)
    assert first.error is None and second.error is None
    assert (first.result.first_seq, second.result.first_seq) == (4, 5)
    assert _committed(engine) == [1, 2, 3, 4, 5]
    runner.project(engine)
    with engine.connect() as conn:
        assert verify(conn).ok


def test_uncommitted_append_is_invisible_and_blocks_other_writers(engine):
    """Both engines: while one append is open, nothing after the committed head becomes visible."""
    feed(engine, [bare(data("StatusChange", f"P{i}")) for i in range(3)])
    release = threading.Event()
    first = Appender(engine, "A", hold=release)
    first.start()
    assert first.appended.wait(timeout=30)
    second = Appender(engine, "B")
    second.start()
    assert second.started.wait(timeout=30)  # (SQLite blocks it at BEGIN IMMEDIATE, PostgreSQL at LOCK)
    # Whatever the second writer is doing, it cannot have committed past the open first one.
    assert _committed(engine) == [1, 2, 3]
    assert second.result is None
    _release_and_check_both_committed_in_order(engine, release, first, second)
