"""Live ingest as a service: every GWS session of one process, the writer and its spool, the
projector, and the health and metrics endpoints.

``/healthz`` answers 200 only when every session is connected (or deliberately stopped) and the
log is writable, else 503; its JSON body says which session or component is unhealthy and since
when.  It never waits for the database: it reports what the writer, the probe and the projector
last saw.  ``/metrics`` is the Prometheus text format.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from ..notifications import epoch_text
from ..projections import runner
from ..seals import Seal, SealError, Sealing
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


# The per-source counters of /metrics: (metric name after workitem_store_, help, SessionStats field).
SESSION_COUNTERS = (
    ("notifications_received_total", "Notifications received from GWS (redeliveries included).", "received"),
    ("notifications_stored_total", "Notifications made durable (log or spool) and so acknowledged.", "stored"),
    ("notifications_appended_total", "Notification rows appended to event_log.", "appended"),
    ("notifications_duplicate_total", "Appended rows marked duplicate.", "duplicates"),
    ("notifications_quarantined_total", "Appended rows quarantined.", "quarantined"),
    ("batches_not_durable_total", "Batches refused because the spool was full (not acknowledged).", "not_durable"),
    ("snapshots_total", "Workitem snapshots stored.", "snapshots"),
    ("snapshot_failures_total", "Workitem snapshots that could not be read.", "snapshot_failures"),
)


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
                 snapshot_timeout: float = 3.0, sealing: Sealing | None = None, **client_options: Any):
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
            await self._start_metrics()
        self.writer.start()
        projector = asyncio.create_task(self._projector(), name="projector") if self.project else None
        sealer = asyncio.create_task(self._sealer(), name="sealer") if self.sealing else None
        tasks = [asyncio.create_task(s.run(), name=f"gws {s.source}") for s in self.sessions]
        stopping = asyncio.create_task(self._stopping.wait())
        all_done = asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.wait([stopping, all_done], return_when=asyncio.FIRST_COMPLETED)
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
            if sealer is not None:
                await sealer
                await self._seal_once(final=True)  # after the last write: covers everything stored
            await self._stop_metrics()
        return [(s.source, r) for s, r in zip(self.sessions, results) if isinstance(r, BaseException)]

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

    async def _sealer(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self.sealing.every)
                return
            except TimeoutError:
                pass
            await self._seal_once()

    async def _seal_once(self, final: bool = False) -> bool:
        try:
            made = await asyncio.to_thread(self.sealing.seal, self.engine)
        except Exception as exc:  # noqa: BLE001 - the log is safe; the next interval tries again
            error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if final:
                logger.error("the last seal failed: %s (seal by hand: `workitem-store seal`)", error)
            elif error != self.seal_error:
                logger.error("sealing failed: %s; trying again in %g s", error, self.sealing.every)
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
        for s, summary in zip(self.sessions, sessions):
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

    def metrics_text(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        health, now = self.health(), time.time()
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")

        def per_source(get):
            return [({"source": s.source}, get(s)) for s in self.sessions]

        def single(value):
            return [] if value is None else [({}, value)]

        p = "workitem_store_"
        for name, help_text, field in SESSION_COUNTERS:
            family(p + name, "counter", help_text, per_source(lambda s, f=field: getattr(s.stats, f)))
        family(p + "handshakes_total", "counter", "Bayeux handshakes.", per_source(lambda s: s.client.handshakes))
        family(p + "reconnects_total", "counter",
               "Sessions or connections re-established after a loss.", per_source(lambda s: s.client.reconnects))
        family(p + "connected", "gauge", "1 while the session's last /meta/connect succeeded.",
               per_source(lambda s: int(s.client.connected)))
        family(p + "connection_state_seconds", "gauge",
               "Seconds since the session's connection state (connected or not) last changed.",
               per_source(lambda s: now - s.client.connected_since))
        family(p + "last_message_age_seconds", "gauge", "Seconds since the session last received a message.",
               [({"source": s.source}, now - s.client.last_message_at) for s in self.sessions
                if s.client.last_message_at is not None])
        log_, spool = health["log"], health["spool"]
        family(p + "log_writable", "gauge", "1 while the log can be written.", single(int(log_["writable"])))
        family(p + "seconds_since_last_commit", "gauge", "Seconds since the last successful commit to the log.",
               single(log_["seconds_since_last_commit"]))
        family(p + "log_head_seq", "gauge", "seq of the last event_log row seen.", single(log_["head_seq"]))
        family(p + "spool_bytes", "gauge", "Bytes in the spool not yet in the log.", single(spool["bytes"]))
        family(p + "spool_oldest_age_seconds", "gauge", "Age of the oldest spooled entry (0: none).",
               single(spool["oldest_age_seconds"] or 0))
        family(p + "projection_lag_rows", "gauge", "Log head minus the projections' checkpoint.",
               single(health["projection"]["lag_rows"]))
        family(p + "projection_errors", "gauge",
               "Log rows the projections skipped (table projection_errors).",
               single(health["projection"]["skipped_rows"]))
        sealed = health["seals"] or {}  # (no samples when sealing is not configured)
        family(p + "seals_total", "counter", "Seals of the log's head made by this process.",
               single(sealed.get("made")))
        family(p + "seal_failures_total", "counter", "Seals that failed (tried again at the next interval).",
               single(sealed.get("failures")))
        family(p + "seal_failing", "gauge", "1 while the last seal attempt failed.",
               single(None if not sealed else int(sealed["error"] is not None)))
        family(p + "last_seal_seq", "gauge", "seq of the log's head at the last seal made.",
               single(sealed.get("last_seq")))
        family(p + "seconds_since_last_seal", "gauge", "Seconds since the last seal made.",
               single(sealed.get("seconds_since_last_seal")))
        family(p + "healthy", "gauge", "1 when /healthz answers 200.", single(int(health["status"] == "ok")))
        return "\n".join(lines) + "\n"

    async def _start_metrics(self) -> None:
        from aiohttp import web

        async def healthz(_request):
            body = self.health()
            return web.json_response(body, status=200 if body["status"] == "ok" else 503,
                                     dumps=lambda v: json.dumps(v, default=str))

        async def metrics(_request):
            return web.Response(text=self.metrics_text(), content_type="text/plain",
                                headers={"X-Content-Type-Options": "nosniff"}, charset="utf-8")

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", metrics)
        runner_ = web.AppRunner(app, access_log=None)
        await runner_.setup()
        site = web.TCPSite(runner_, self.metrics_host, self.metrics_port)
        await site.start()
        self._web = runner_
        self.metrics_port = runner_.addresses[0][1]  # the real port when 0 was asked
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


def _escape_label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    return repr(round(float(value), 6))
