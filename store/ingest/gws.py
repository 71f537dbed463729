"""One GWS user's workitem notifications into the log, with the record of where some may be missing.

A GWS session is a Bayeux client (``ingest/bayeux.py``) at ``<gws-url>/api/v2/notifications``
subscribed to ``/v2/me/workitems``, over the user's own HTTP (``ingest/gws_http.py``: Basic
auth, cookies, TLS, proxy and, where the server enables it, the CSRF token).  Where it connects
is ``ingest/config.py``; how entries become durable, ``ingest/writer.py``; the counters kept
here (SessionStats) are what ``/metrics`` reports (``ingest/metrics.py``).

What it hands to the writer (``ingest/writer.py``), in the order things happen:

- a session marker ``started`` after each handshake and subscription (a CometD session is new
  and empty: what was published while no session existed is not delivered, ever);
- a snapshot: ``GET /api/v2/me/workitems?fields=*`` (GWS "Recovering Existing State"), the
  response body byte for byte, read before the session's first notification is handed on, so
  that the projections can reconcile what happened meanwhile; ``snapshot-failed`` when it
  cannot be read;
- each batch of notifications, acknowledged to the server only once durable (log or spool);
- ``lost`` when the session is gone (402, expiry, a failure the server will not make good),
  ``resumed`` when, without the ack extension, it answers again, ``ended`` at a clean stop.

Each entry of a session gets its own ``received_at``, strictly increasing (rows of a batch are one
microsecond apart), so (session, received_at) identifies an entry.  A session's id in the log
(``event_log.session``) is ``<instance>/<source>/<n>``: the ingest process, the source and the
count of its sessions for that source.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..gws_protocol import CHANNEL, SNAPSHOT_PATH
from ..notifications import NOTIFICATION, SESSION, SNAPSHOT, UNSTORABLE_CHARS, decode_text, epoch_text
from .bayeux import BayeuxClient
from .bayeux_events import SessionEvent
from .bayeux_transport import tls_problem
from .config import SessionConfig
from .gws_http import GwsHttp
from .spool import Entry
from .writer import DurableLog

logger = logging.getLogger(__name__)


@dataclass
class SessionStats:
    received: int = 0     # messages handed to the store (redeliveries included)
    stored: int = 0       # made durable (in the log, or in the spool on the way there)
    appended: int = 0     # event_log rows written for notifications
    duplicates: int = 0
    quarantined: int = 0
    batches: int = 0
    snapshots: int = 0
    snapshot_failures: int = 0
    not_durable: int = 0  # batches refused (spool full): not acknowledged


def storable(value: Any) -> Any:
    """``value`` with every string (keys too) made storable: NUL and unpaired surrogates, which
    neither UTF-8 nor PostgreSQL text/jsonb can hold, become their escape as visible text
    (``\\u0000``, ``\\ud800``).  A marker carries what the server said (error text, advice),
    and a JSON ``\\ud800`` there would otherwise make its row unwritable, forever."""
    if isinstance(value, str):
        return UNSTORABLE_CHARS.sub(lambda m: f"\\u{ord(m.group()):04x}", value)
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    return value


def _epoch(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


class GwsSession:
    """One GWS user's notifications into the log: ``await session.run()`` until ``stop()``.

    ``instance`` names the ingest process (it prefixes session ids); ``on_session_id(id)`` is
    told every new session id before its "started" marker is written (the spool keeps them, so
    that a successor can record a session this process never ended).
    """

    def __init__(self, config: SessionConfig, writer: DurableLog, *, instance: str,
                 on_session_id: Callable[[str], Any] | None = None, snapshot_timeout: float = 3.0,
                 **client_options: Any):
        self.config, self.writer, self.instance = config, writer, instance
        self.stats = SessionStats()
        self.session_id: str | None = None
        self.snapshot_timeout = snapshot_timeout
        self._on_session_id = on_session_id
        self._sessions = 0
        self._next_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        self._stopped = False
        # Made here, so construct sessions inside the event loop; closed by run()/stop().
        self.http = GwsHttp(config)
        self.client = BayeuxClient(config.notifications_url, [CHANNEL], self._on_batch, on_event=self._on_event,
                                   **self.http.client_options(), **client_options)
        self.http.network_delay = self.client.network_delay

    @property
    def source(self) -> str:
        return self.config.source_name

    async def run(self) -> None:
        """Fetch the CSRF token (if the server has one), then follow notifications until
        ``stop()``; raises BayeuxError when the session cannot go on (refused login, a TLS
        certificate not accepted, reconnect advice none)."""
        try:
            if not self._stopped:
                await self.http.fetch_csrf()
            if not self._stopped:
                await self.client.run()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Let a running append finish, send /meta/disconnect ("ended"), end ``run()``."""
        self._stopped = True
        await self.client.stop()
        await self.http.close()

    # -- what goes to the log -------------------------------------------------------------------

    def _stamp(self, at: dt.datetime, rows: int = 1) -> dt.datetime:
        """``at``, or later: every entry of the session gets instants of its own."""
        at = max(at, self._next_at)
        self._next_at = at + rows * dt.timedelta(microseconds=1)
        return at

    async def _write(self, kind: str, texts: list[str], at: dt.datetime):
        entry = Entry(kind, self.source, self.session_id or "", self._stamp(at, len(texts)), texts)
        return await self.writer.append(entry)

    async def _mark(self, event: str, at: float, **fields: Any) -> None:
        marker = {"event": event, "source": self.source, "user": self.config.user, "url": self.client.where,
                  "instance": self.instance, **{k: v for k, v in fields.items() if v is not None}}
        try:
            await self._write(SESSION, [json.dumps(storable(marker), ensure_ascii=False)], _epoch(at))
        except Exception:
            if event == "started":
                raise  # nothing of the session may be stored before its start is
            logger.exception("GWS %s: the %s marker could not be stored", self.source, event)

    async def _on_event(self, event: SessionEvent) -> None:
        instants = {"handshake_at": event.handshake_at, "since": event.since}
        times = {k: epoch_text(v) for k, v in instants.items() if v}
        common = {"client_id": event.client_id, "ack": event.ack, "cause": event.cause, **times}
        if event.kind == "started":
            self._sessions += 1
            self.session_id = f"{self.instance}/{self.source}/{self._sessions}"
            self._next_at = dt.datetime.min.replace(tzinfo=dt.UTC)
            if self._on_session_id is not None:
                await self._on_session_id(self.session_id)
            await self._mark("started", event.at, **common)
            await self._snapshot()
        elif event.kind == "resumed":
            await self._mark("resumed", event.at, **common)
            await self._snapshot()
        elif event.kind == "lost":
            # The marker stands where following ended: the last moment the session was known alive.
            await self._mark("lost", event.since or event.at, detected_at=epoch_text(event.at), **common)
        elif event.kind == "ended":
            await self._mark("ended", event.at, **common)

    async def _snapshot(self) -> None:
        """Read the agent's current workitems and store the response as it is (or a
        ``snapshot-failed`` marker): the projections reconcile the store with it."""
        at = time.time()
        failure: dict[str, Any] | None = None
        try:
            status, _, body = await self.http.get(SNAPSHOT_PATH, self.snapshot_timeout)
        except aiohttp.ClientSSLError as exc:
            failure = {"error": tls_problem(exc)}
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            failure = {"error": f"{type(exc).__name__}: {exc}"}
        else:
            if status == 200:
                text, _ = decode_text(body)  # not UTF-8: kept escaped, and quarantined as not JSON
                await self._write(SNAPSHOT, [text], _epoch(at))
                self.stats.snapshots += 1
                return
            failure = {"status": status, "body": body[:500].decode("utf-8", "replace")}
        self.stats.snapshot_failures += 1
        logger.warning("GWS %s: reading the current workitems failed (%s): what happened while no "
                       "session listened is not reconciled", self.source, failure)
        await self._mark("snapshot-failed", at, path=SNAPSHOT_PATH, **failure)

    async def _on_batch(self, batch: list[tuple[dict, str]]) -> None:
        self.stats.received += len(batch)
        try:
            await self._write(NOTIFICATION, [raw for _, raw in batch], dt.datetime.now(dt.UTC))
        except Exception:
            self.stats.not_durable += 1
            raise
        self.stats.batches += 1
        self.stats.stored += len(batch)

    def appended(self, entry: Entry, result) -> None:
        """The writer reports an entry of this session in the log (directly or from the spool)."""
        if entry.kind == NOTIFICATION:
            self.stats.appended += result.appended
            self.stats.duplicates += result.duplicates
            self.stats.quarantined += result.quarantined

    # -- status ---------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        c = self.client
        state = ("failed" if c.error is not None else "stopped" if self._stopped
                 else "connected" if c.connected else "connecting")
        return {"user": self.config.user, "source": self.source, "url": c.where, "session": self.session_id,
                "state": state, "since": epoch_text(c.connected_since),
                "connected": c.connected, "ack": c.ack_enabled,
                "error": None if c.error is None else str(c.error),
                "handshakes": c.handshakes, "reconnects": c.reconnects, "failures": c.failures,
                "received": self.stats.received, "stored": self.stats.stored, "appended": self.stats.appended,
                "duplicates": self.stats.duplicates, "quarantined": self.stats.quarantined,
                "snapshots": self.stats.snapshots, "snapshot_failures": self.stats.snapshot_failures,
                "not_durable": self.stats.not_durable,
                "last_message_age_seconds": None if c.last_message_at is None
                else round(time.time() - c.last_message_at, 3)}

