"""Making what live sessions receive durable: in the log when the database takes it in time,
else in the spool (ingest/spool.py), drained into the log in order once the database is back.

``append(entry)`` returns only once the entry is durable, and only then may a session
acknowledge it; it raises SpoolFull (nothing durable, nothing to acknowledge) when the spool
has reached its bound.  Two modes:

- direct: the entries waiting at one moment share one transaction (group commit: each entry is
  still appended whole).  A commit that fails, or takes longer than ``spool_after`` seconds,
  sends its entries to the spool instead, and the writer turns to spooling.  (The slow commit
  may still succeed later: the drain finds those entries already in the log and skips them.)
- spooling: every entry is appended to the spool (fsync'd) and acknowledged; a drain task moves
  the spool into the log in order, a chunk a transaction; once it has caught up, direct again.
  Nothing goes to the log directly while anything is spooled, so log order is receive order.

Each entry of a live session has its own ``received_at`` (sessions make them strictly
increasing), so (session, received_at) says whether an entry is already in the log.

At start, spools left by ingest processes that are gone are drained first; then each session
such a process started and never ended gets a "lost" marker (the process was killed or crashed).
The writer also probes the database every second when idle, so that health says the truth
when no notification arrives.  A database error is logged once per change of state.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from sqlalchemy import Engine, func, select

from .. import log, redaction
from ..bulk import collections_postponed
from ..db import probe_writable, text_sha256, write_transaction
from ..errors import StoreError
from ..notifications import (
    NOTIFICATION,
    SESSION,
    Notification,
    classify_record,
    epoch_text,
    load_json,
    parse_message,
    utc_text,
)
from ..schema import event_log
from .spool import Entry, Spool

logger = logging.getLogger(__name__)

DRAIN_ENTRIES = 500  # entries per drain transaction


class SpoolFull(StoreError):
    """The database cannot take entries and the spool has reached --spool-max."""


@dataclass
class WriterStatus:
    """What health and metrics report of the log (epoch seconds)."""

    writable: bool = True
    writable_since: float = 0.0
    error: str | None = None
    last_commit_at: float | None = None
    head_seq: int = 0


def _batch(entry: Entry) -> log.Batch:
    return log.Batch(notifications_of(entry), entry.source, entry.received_at)


def notifications_of(entry: Entry) -> list[Notification]:
    """The log rows of an entry, classified by the same rules as every input (a text the spool
    holds redacted with its claim: stored as redacted at ingest, its original hash kept)."""
    if entry.kind != NOTIFICATION:
        rows = [classify_record(entry.kind, text, entry.session) for text in entry.texts]
    else:  # the text, not the message the Bayeux client parsed: the same checks as a file line
        rows = [parse_message(text, entry.session) for text in entry.texts]
    for i, claim in enumerate(entry.redacted or ()):
        if claim is not None:
            rows[i] = replace(rows[i], redaction=(claim["payload_sha256"], (claim["record"],)))
    return rows


def redacted_for_spool(entry: Entry, keys: frozenset[str], redacted_by: str) -> Entry:
    """``entry`` as the spool may hold it: the values of ``keys`` in its texts' userData replaced
    by the marker, each such text with the claim the log stores it by (the received text's
    SHA-256 and its record), so that no clear value of those keys reaches the disk."""
    if not keys or entry.kind == SESSION:
        return entry
    texts: list[str] = []
    claims: list[dict | None] = []
    now = dt.datetime.now(dt.UTC)
    for text in entry.texts:
        changed = redaction.at_ingest(text, entry.kind, keys, redacted_by, now)
        if changed is None:
            texts.append(text)
            claims.append(None)
            continue
        payload, record = changed
        texts.append(payload)
        claims.append({"payload_sha256": text_sha256(text),
                       "record": {**record, "redacted_at": utc_text(now)}})
    return entry if not any(claims) else replace(entry, texts=texts, redacted=claims)


class DurableLog:
    def __init__(self, engine: Engine, spool: Spool, abandoned: list[Spool] | None = None, *,
                 spool_after: float = 2.0, spool_max: int = 1 << 30, probe_interval: float = 1.0):
        self.engine, self.spool, self.abandoned = engine, spool, list(abandoned or [])
        self.spool_after, self.spool_max, self.probe_interval = spool_after, spool_max, probe_interval
        # Told of every entry that reached the log, directly or from the spool (in the event loop).
        self.on_appended: Callable[[Entry, log.AppendResult], None] | None = None
        self.status = WriterStatus(writable_since=time.time())
        self.transactions = 0
        self.context = log.AppendContext()
        self._redactor = redaction.redactor(engine)  # who redacts what the spool holds (no database then)
        # The database work runs in threads of its own: a commit that hangs must not hold up
        # spooling, draining or probing.
        self._db = ThreadPoolExecutor(max_workers=8, thread_name_prefix="log-db")
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="log-spool")
        self._spooling = bool(self.abandoned) or spool.pending_bytes > 0
        self._waiting: list[tuple[Entry, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._spool_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._drainer: asyncio.Task | None = None
        self._inflight: set[asyncio.Future] = set()  # commits that outlived spool_after
        self._committing = 0
        self._closing = False

    # -- what sessions call ------------------------------------------------------------------

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._write_loop(), name="log writer"),
                           asyncio.create_task(self._probe_loop(), name="log probe")]
            if self._spooling:
                self._start_drain()

    async def append(self, entry: Entry) -> log.AppendResult | None:
        """Make ``entry`` durable; the AppendResult when it went to the log directly, None when
        it went to the spool."""
        # Session markers are small and must not be lost: only they pass a full spool.
        if (self._spooling and entry.kind != SESSION
                and self.spool.pending_bytes + sum(map(len, entry.texts)) > self.spool_max):
            raise SpoolFull(f"the spool {self.spool.directory} holds {self.spool.pending_bytes} bytes "
                            f"(--spool-max {self.spool_max}); not acknowledging until it drains")
        if self._closing:
            raise StoreError("the log writer is closed")
        self.start()
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((entry, future))
        self._wake.set()
        return await future

    @property
    def spooling(self) -> bool:
        return self._spooling

    def spool_bytes(self) -> int:
        return self.spool.pending_bytes + sum(s.pending_bytes for s in self.abandoned)

    def spool_oldest(self) -> dt.datetime | None:
        times = [s.oldest for s in (*self.abandoned, self.spool) if s.oldest is not None and s.pending_bytes]
        return min(times) if times else None

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Write what waits, give the drain ``drain_timeout`` seconds to finish, stop.  What is
        still spooled stays on disk for the next ingest process."""
        for _ in range(1000):  # what waits is written (or spooled) within seconds
            if not self._waiting:
                break
            await asyncio.sleep(0.01)
        if self._drainer is not None and not self._drainer.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drainer), drain_timeout)
        self._closing = True
        for task in (*self._tasks, self._drainer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for _, future in self._waiting:
            if not future.done():
                future.set_exception(StoreError("the log writer closed before this was stored"))
        self._db.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=True)
        for spool in self.abandoned:
            spool.close()
        if self.spool.pending_bytes == 0:
            self.spool.remove()
        else:
            logger.warning("%d bytes stay in the spool %s: the next ingest process on this store drains them",
                           self.spool.pending_bytes, self.spool.directory)
            self.spool.close()

    # -- direct and spooling -----------------------------------------------------------------

    async def _run(self, executor, function, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, function, *args)

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            wave, self._waiting = self._waiting, []
            while wave:
                if not self._spooling:
                    if await self._commit(wave):
                        break
                    self._spooling = True
                    self._start_drain()
                async with self._spool_lock:
                    if not self._spooling:
                        continue  # the drain caught up meanwhile: commit directly
                    try:
                        spooled = [redacted_for_spool(entry, self.context.redact_keys, self._redactor)
                                   for entry, _ in wave]
                        await self._run(self._io, self.spool.append, spooled)
                    except Exception as exc:  # noqa: BLE001 - fail these entries, never the write loop
                        logger.error("cannot write the spool %s: %s", self.spool.directory, exc)
                        for _, future in wave:
                            if not future.done():
                                future.set_exception(StoreError(f"cannot write the spool: {exc}"))
                        break
                for _, future in wave:
                    if not future.done():
                        future.set_result(None)
                break

    async def _commit(self, wave) -> bool:
        """Commit ``wave`` in one transaction; False when it failed or did not finish in time."""
        task = asyncio.get_running_loop().run_in_executor(self._db, self._write, [entry for entry, _ in wave])
        self._committing += 1  # no probe meanwhile: it would wait for this very commit's lock
        task.add_done_callback(lambda _: setattr(self, "_committing", self._committing - 1))
        done, _ = await asyncio.wait({task}, timeout=self.spool_after)
        if not done:
            self._unwritable(f"a commit took longer than {self.spool_after:g} s")
            # It may still commit: the drain waits for it, then skips what it stored.
            self._inflight.add(task)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            task.add_done_callback(self._inflight.discard)
            return False
        failure = task.exception()
        if failure is not None:
            self._unwritable(_describe(failure))
            return False
        self._writable()
        for (entry, future), result in zip(wave, task.result(), strict=True):
            self._appended(entry, result)
            if not future.done():
                future.set_result(result)
        return True

    def _appended(self, entry: Entry, result: log.AppendResult) -> None:
        if self.on_appended is not None:
            self.on_appended(entry, result)

    def _write(self, entries: list[Entry]) -> list[log.AppendResult]:
        with collections_postponed(), write_transaction(self.engine) as conn:
            results = log.append_batches(conn, [_batch(e) for e in entries], self.context)
        self.transactions += 1
        last = [r.last_seq for r in results if r.last_seq is not None]
        if last:
            self.status.head_seq = max(self.status.head_seq, *last)
        return results

    def _start_drain(self) -> None:
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain_loop(), name="spool drain")

    async def _drain_loop(self) -> None:
        delay = 0.1
        while not self._closing:
            spool = self.abandoned[0] if self.abandoned else self.spool
            if self._inflight:
                await asyncio.wait(set(self._inflight))  # their entries are spooled too: see _commit
                continue
            try:
                batch = await self._run(self._io, lambda s=spool: list(s.read(s.drained, DRAIN_ENTRIES)))
                if not batch:
                    if spool is not self.spool:
                        await self._run(self._db, self._close_abandoned, spool)
                        self.abandoned.pop(0)
                        continue
                    async with self._spool_lock:
                        if self.spool.pending_bytes == 0:
                            self._spooling = False
                            self._wake.set()
                            logger.info("the spool is drained: writing to the log directly again")
                            return
                    continue
                appended = await self._run(self._db, self._drain_write, [entry for entry, _ in batch])
            except Exception as exc:  # noqa: BLE001 - whatever it is, the spool keeps the entries: retry
                if not isinstance(exc, (StoreError, OSError)) and _describe(exc) != self.status.error:
                    logger.exception("draining the spool failed")  # a bug: once, with its traceback
                self._unwritable(_describe(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._writable()
            for entry, result in appended:
                self._appended(entry, result)
            delay = 0.1
            async with self._spool_lock:
                await self._run(self._io, spool.mark_drained, batch[-1][1])

    def _drain_write(self, entries: list[Entry]) -> list[tuple[Entry, log.AppendResult]]:
        with collections_postponed(), write_transaction(self.engine) as conn:
            c = event_log.c
            present: set[tuple[str, dt.datetime]] = set()
            for session in {e.session for e in entries}:
                times = [e.received_at for e in entries if e.session == session]
                present.update((s, at) for s, at in conn.execute(select(c.session, c.received_at).where(
                    c.session == session, c.received_at >= min(times), c.received_at <= max(times))))
            missing = [e for e in entries if (e.session, e.received_at) not in present]  # else a slow commit
            appended = list(zip(missing, log.append_batches(conn, [_batch(e) for e in missing], self.context),
                                strict=True))                                             # stored them after all
        self.transactions += 1
        self.status.head_seq = max(self.status.head_seq, *(r.last_seq or 0 for _, r in appended), 0)
        return appended

    def _close_abandoned(self, spool: Spool) -> None:
        """A gone process's spool is in the log: record the sessions it never ended as lost."""
        c = event_log.c
        with write_transaction(self.engine) as conn:
            for session in spool.sessions():
                last = conn.execute(select(c.source, c.payload).where(c.session == session, c.kind == SESSION,
                                                                  c.quarantine_reason.is_(None))
                                    .order_by(c.received_at.desc()).limit(1)).first()
                if last is None or load_json(last.payload).get("event") not in ("started", "resumed"):
                    continue
                since = conn.execute(select(func.max(c.received_at)).where(c.session == session)).scalar_one()
                marker = {"event": "lost", "source": last.source, "instance": spool.instance,
                          "cause": "the ingest process ended without closing the session (killed or crashed)",
                          "since": utc_text(since), "detected_at": utc_text(dt.datetime.now(dt.UTC))}
                entry = Entry(SESSION, last.source, session, since + log.MICROSECOND, [json.dumps(marker)])
                log.append_batches(conn, [_batch(entry)], self.context)
                logger.warning("session %s of %s was never ended by its process: recorded as lost since %s",
                               session, last.source, utc_text(since))
        spool.remove()

    # -- health ------------------------------------------------------------------------------

    def _writable(self) -> None:
        self.status.last_commit_at = time.time()
        if not self.status.writable:
            logger.warning("the log is writable again (was not since %s)", epoch_text(self.status.writable_since))
            self.status.writable, self.status.writable_since, self.status.error = True, time.time(), None

    def _unwritable(self, error: str) -> None:
        if self.status.writable:
            logger.error("the log cannot be written: %s; spooling what arrives", error)
            self.status.writable, self.status.writable_since = False, time.time()
        self.status.error = error

    async def _probe_loop(self) -> None:
        """When nothing was committed for a while, check that a write could be."""
        while True:
            await asyncio.sleep(self.probe_interval)
            if self._spooling or self._waiting or self._committing:
                continue  # the drain or the writer tells
            last = self.status.last_commit_at
            if last is not None and time.time() - last < self.probe_interval:
                continue
            task = asyncio.get_running_loop().run_in_executor(self._db, probe_writable, self.engine)
            done, _ = await asyncio.wait({task}, timeout=max(3.0, self.probe_interval * 3))
            if not done:
                self._unwritable("the database did not answer a write probe within 3 s")
            elif (failure := task.exception()) is not None:
                self._unwritable(_describe(failure))
            else:
                self.status.head_seq = max(self.status.head_seq, task.result())
                self._writable()


def _describe(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

