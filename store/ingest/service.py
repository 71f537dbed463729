"""Live ingest as a service: every GWS session of one process, the writer and its spool, the
projector, the sealer, and the health of it all; ``run`` is the whole service until a signal.

``/healthz`` (served by ``metrics``) answers 200 only when every session is connected (or
deliberately stopped) and the log is writable, else 503; its JSON body (``Ingestor.health``)
says which session or component is unhealthy and since when.  It never waits for the database:
it reports what the writer, the probe and the projector last saw.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from ..notifications import epoch_text
from ..projections import runner
from ..seals import Seal, SealError, Sealing
from . import metrics
from .config import SessionConfig
from .gws import GwsSession
from .spool import Entry, Spool
from .writer import DurableLog

logger = logging.getLogger(__name__)


def store_identity(engine: Engine) -> str:
    """What a spool records as its store: the database URL without password."""
    return engine.url.render_as_string(hide_password=True)


def default_spool_root(engine: Engine) -> Path:
    """``<database file>.spool`` next to a SQLite store; for a server, ``workitem-store-spool``
    in the working directory, in a subdirectory per database."""
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        return Path(f"{engine.url.database}.spool")
    digest = hashlib.sha256(store_identity(engine).encode()).hexdigest()[:12]
    return Path("workitem-store-spool") / f"{engine.url.database or 'db'}-{digest}"


class Ingestor:
    """All sessions of one process, concurrently, plus the writer, the projector and the metrics
    server.  ``await ingestor.run()`` until ``stop()`` (e.g. from a signal handler): then every
    client disconnects, what waits is written, and the projections are brought up to date.

    With ``sealing``, the log's head is sealed every ``sealing.every`` seconds and once more at
    the end, after the last write and projection (so the last seal covers everything stored).
    A seal that fails is logged and tried again at the next interval; ingest goes on.
    """

    def __init__(self, engine: Engine, configs: list[SessionConfig], *, project: bool = True,
                 project_interval: float = 0.2, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1", spool_dir: str | Path | None = None,
                 spool_max: int = 1 << 30, spool_after: float = 2.0, probe_interval: float = 1.0,
                 snapshot_timeout: float = 3.0, sealing: Sealing | None = None, redact_keys: Collection[str] = (),
                 **client_options: Any):
        self.engine, self.project, self.project_interval = engine, project, project_interval
        self.sealing = sealing
        if sealing is not None and sealing.witness is not None:
            check_witness(sealing.witness)  # before any session starts
        root = Path(spool_dir) if spool_dir is not None else default_spool_root(engine)
        store = store_identity(engine)
        abandoned = Spool.abandoned(root, store)
        self.spool = Spool.create(root, store)
        self.instance = self.spool.instance
        self.writer = DurableLog(engine, self.spool, abandoned, spool_after=spool_after, spool_max=spool_max,
                                 probe_interval=probe_interval)
        self.writer.on_appended = self._appended
        # The userData keys redacted before a row is first written (log.append), spool drains included.
        self.writer.context.redact_keys = frozenset(redact_keys)
        self.sessions = [GwsSession(c, self.writer, instance=self.instance, on_session_id=self._session_started,
                                    snapshot_timeout=snapshot_timeout, **client_options) for c in configs]
        self._by_source = {s.source: s for s in self.sessions}
        self.metrics_port, self.metrics_host = metrics_port, metrics_host
        self.projections_run = 0
        self.last_projected_seq: int | None = None
        self.projection_error: str | None = None
        self.projection_failing_since: str | None = None
        self.projection_errors = 0  # rows of projection_errors (log rows the projections skipped)
        self.seals_made = 0  # by this process
        self.seal_failures = 0
        self.last_seal: Seal | None = None  # the last one this process made
        self.last_seal_at: float | None = None
        self.seal_error: str | None = None
        self.seal_failing_since: str | None = None
        self.started_at = time.time()
        self._dirty = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped_by_request = False
        self._web: Any = None
        if abandoned:
            logger.info("draining %d spool(s) left by ingest processes that are gone: %s", len(abandoned),
                        ", ".join(str(s.directory) for s in abandoned))

    def _appended(self, entry: Entry, result) -> None:
        session = self._by_source.get(entry.source)
        if session is not None:
            session.appended(entry, result)
        self._dirty.set()

    async def _session_started(self, session_id: str) -> None:
        await asyncio.to_thread(self.spool.add_session, session_id)

    @property
    def stopped_by_request(self) -> bool:
        return self._stopped_by_request

    def stop(self) -> None:
        """Ask run() to end (safe from a signal handler)."""
        self._stopped_by_request = True
        self._stopping.set()

    async def run(self) -> list[tuple[str, BaseException]]:
        """Follow every session until stop() or until each has ended by itself; returns the
        sessions that ended with an error, as (source, error)."""
        if self.metrics_port is not None:
            await self._start_metrics(self.metrics_port)
        self.writer.start()
        projector = asyncio.create_task(self._projector(), name="projector") if self.project else None
        sealing = self.sealing
        sealer = asyncio.create_task(self._sealer(sealing), name="sealer") if sealing else None
        tasks = [asyncio.create_task(s.run(), name=f"gws {s.source}") for s in self.sessions]
        stopping = asyncio.create_task(self._stopping.wait())
        all_done = asyncio.gather(*tasks, return_exceptions=True)
        either: list[asyncio.Future[Any]] = [stopping, all_done]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when cancelled: the sessions end (their "ended" markers written) before the writer.
            stopping.cancel()
            await asyncio.shield(asyncio.gather(*(s.stop() for s in self.sessions), return_exceptions=True))
            results = await asyncio.shield(all_done)
            await self.writer.close()
            self._stopping.set()
            if projector is not None:
                await projector
                await self._project_once()  # the final flush
            if sealing is not None and sealer is not None:
                await sealer
                await self._seal_once(sealing, final=True)  # after the last write: covers everything stored
            await self._stop_metrics()
        return [(s.source, r) for s, r in zip(self.sessions, results, strict=True) if isinstance(r, BaseException)]

    # -- the projector --------------------------------------------------------------------------

    async def _projector(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            dirty = asyncio.create_task(self._dirty.wait())
            stop = asyncio.create_task(self._stopping.wait())
            await asyncio.wait([dirty, stop], return_when=asyncio.FIRST_COMPLETED)
            dirty.cancel()
            stop.cancel()
            if self._stopping.is_set():
                return
            self._dirty.clear()
            started = time.monotonic()
            failures = 0 if await self._project_once() else failures + 1
            # Debounce: at most one run per project_interval (longer after failures), however
            # many batches arrive.
            rest = self.project_interval * 2 ** min(failures, 6) - (time.monotonic() - started)
            if rest > 0:
                try:
                    await asyncio.wait_for(self._stopping.wait(), rest)
                except TimeoutError:
                    pass

    async def _project_once(self) -> bool:
        try:
            result = await asyncio.to_thread(runner.project, self.engine)
        except Exception as exc:  # noqa: BLE001 - the log is safe already; the next run catches up
            error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if error != self.projection_error:
                logger.error("projecting failed: %s; trying again", error)
            if self.projection_error is None:
                self.projection_failing_since = epoch_text(time.time())
            self.projection_error = error
            self._dirty.set()
            return False
        if self.projection_error is not None:
            logger.warning("projecting works again")
        self.projection_error = None
        self.projections_run += 1
        self.projection_errors = result.errors
        self.last_projected_seq = result.to_seq
        self.writer.status.head_seq = max(self.writer.status.head_seq, result.to_seq)
        return True

    # -- the sealer -------------------------------------------------------------------------------

    async def _sealer(self, sealing: Sealing) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), sealing.every)
                return
            except TimeoutError:
                pass
            await self._seal_once(sealing)

    async def _seal_once(self, sealing: Sealing, final: bool = False) -> bool:
        try:
            made = await asyncio.to_thread(sealing.seal, self.engine)
        except Exception as exc:  # noqa: BLE001 - the log is safe; the next interval tries again
            error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if final:
                logger.error("the last seal failed: %s (seal by hand: `workitem-store seal`)", error)
            elif error != self.seal_error:
                logger.error("sealing failed: %s; trying again in %g s", error, sealing.every)
            if self.seal_error is None:
                self.seal_failing_since = epoch_text(time.time())
            self.seal_error = error
            self.seal_failures += 1
            return False
        if self.seal_error is not None:
            logger.warning("sealing works again")
        (logger.info if final else logger.debug)("sealed: seal %d, seq %d", made.n, made.seq)
        self.seal_error = self.seal_failing_since = None
        self.seals_made += 1
        self.last_seal, self.last_seal_at = made, time.time()
        return True

    # -- health and metrics -----------------------------------------------------------------------

    def _projection_lag(self) -> int | None:
        if self.last_projected_seq is None:
            return None
        return max(0, self.writer.status.head_seq - self.last_projected_seq)

    def health(self) -> dict[str, Any]:
        """The /healthz body; ``status`` "ok" exactly when nothing is listed as unhealthy."""
        status, now = self.writer.status, time.time()
        unhealthy = []
        sessions = [s.summary() for s in self.sessions]
        for s, summary in zip(self.sessions, sessions, strict=True):
            if summary["state"] in ("connecting", "failed"):
                reason = summary["error"] or (
                    f"not connected ({s.client.failures} failures)" if s.client.handshakes else "not connected yet")
                unhealthy.append({"component": f"session {s.source}", "since": summary["since"], "reason": reason})
        if self.writer.spooling and self.spool.pending_bytes >= self.writer.spool_max:
            unhealthy.append({"component": "spool", "since": epoch_text(status.writable_since),
                              "reason": "the spool is full: batches are not acknowledged until it drains"})
        if self.projection_error is not None and status.writable:  # (else the log's entry says why)
            unhealthy.append({"component": "projection", "since": self.projection_failing_since,
                              "reason": f"projecting fails: {self.projection_error}"})
        if self.seal_error is not None and status.writable:  # (else the log's entry says why)
            unhealthy.append({"component": "seals", "since": self.seal_failing_since,
                              "reason": f"sealing fails: {self.seal_error}"})
        if not status.writable:
            unhealthy.append({"component": "log", "since": epoch_text(status.writable_since),
                              "reason": status.error or "the database cannot be written"})
        oldest = self.writer.spool_oldest()
        return {
            "status": "stopping" if self._stopping.is_set() else "unhealthy" if unhealthy else "ok",
            "unhealthy": unhealthy,
            "uptime_seconds": round(now - self.started_at, 3),
            "instance": self.instance,
            "log": {"writable": status.writable, "since": epoch_text(status.writable_since), "error": status.error,
                    "seconds_since_last_commit": None if status.last_commit_at is None
                    else round(now - status.last_commit_at, 3),
                    "head_seq": status.head_seq, "spooling": self.writer.spooling},
            "spool": {"directory": str(self.spool.directory), "bytes": self.writer.spool_bytes(),
                      "max_bytes": self.writer.spool_max,
                      "oldest_age_seconds": None if oldest is None
                      else round((dt.datetime.now(dt.UTC) - oldest).total_seconds(), 3)},
            "projection": {"last_seq": self.last_projected_seq, "lag_rows": self._projection_lag(),
                           "error": self.projection_error, "runs": self.projections_run,
                           "skipped_rows": self.projection_errors},
            "seals": None if self.sealing is None else {
                "every_seconds": self.sealing.every,
                "witness": None if self.sealing.witness is None else str(self.sealing.witness),
                "made": self.seals_made, "failures": self.seal_failures,
                "last_n": None if self.last_seal is None else self.last_seal.n,
                "last_seq": None if self.last_seal is None else self.last_seal.seq,
                "last_sealed_at": None if self.last_seal is None else self.last_seal.sealed_at,
                "seconds_since_last_seal": None if self.last_seal_at is None else round(now - self.last_seal_at, 3),
                "error": self.seal_error, "failing_since": self.seal_failing_since},
            "sessions": sessions,
        }

    async def _start_metrics(self, port: int) -> None:
        self._web = await metrics.serve(self, self.metrics_host, port)
        self.metrics_port = self._web.addresses[0][1]  # the real port when 0 was asked
        logger.info("metrics on http://%s:%d/metrics (health: /healthz)", self.metrics_host, self.metrics_port)

    async def _stop_metrics(self) -> None:
        if self._web is not None:
            await self._web.cleanup()
            self._web = None


def check_witness(path: str | Path) -> None:
    """SealError unless seals can be appended to the witness file ``path``: its directory exists
    and the file (or, for a new file, the directory) is writable.  Said at startup, before any
    session starts, rather than at the first seal."""
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise SealError(f"the witness file's directory {directory} does not exist (create it, or give another "
                        "--witness)")
    if path.is_dir():
        raise SealError(f"the witness file {path} is a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise SealError(f"the witness file {path} is not writable")
    if not path.exists() and not os.access(directory, os.W_OK | os.X_OK):
        raise SealError(f"cannot create the witness file {path}: its directory is not writable")


class TaskNameFilter(logging.Filter):
    """Gives each log record ``task``: the name of the asyncio task logging it (each session
    runs in a task named ``gws <source>``), or ``-`` outside one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop in this thread
            task = None
        record.task = task.get_name() if task is not None else "-"
        return True


def configure_logging(verbose: bool = False) -> None:
    """The service's log lines on standard error, each naming the session (task) it is about;
    with ``verbose``, every appended batch too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TaskNameFilter())  # [gws <source>]: which session a line is about
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(task)s] %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("aiohttp.access", "alembic", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


SessionErrors = list[tuple[str, BaseException]]  # (source, error) of the sessions that ended with one


def run(engine: Engine, configs: list[SessionConfig], **options: Any) -> tuple[Ingestor, SessionErrors]:
    """Run an Ingestor (``options``: its keyword arguments) in an event loop of its own until
    SIGINT or SIGTERM (which stop it cleanly: sessions disconnected, what waits written, the
    projections brought up to date) or until every session has ended by itself.

    Returns the Ingestor (its sessions' counters, seals, spool) and the sessions that ended with
    an error, as (source, error).
    """
    async def follow() -> tuple[Ingestor, SessionErrors]:
        task = asyncio.current_task()
        if task is not None:
            task.set_name("ingest")
        ingestor = Ingestor(engine, configs, **options)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, ingestor.stop)
        return ingestor, await ingestor.run()

    return asyncio.run(follow())
