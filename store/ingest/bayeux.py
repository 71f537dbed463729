"""A CometD (Bayeux 1.0) long-polling client on aiohttp that hands message batches to a callback.

It knows nothing of the store: it handshakes (alone in its request), subscribes to the given
channels, then keeps exactly one ``/meta/connect`` outstanding, following the server's advice
(``interval`` and ``timeout`` are milliseconds; the latest advice replaces earlier advice).
Each response's non-meta messages go, in the order received, to ``on_batch`` as a list of
``(message, raw_text)``: ``raw_text`` is the exact text of that message in the response body
(``raw_text.encode()`` gives its bytes back, except where the body is not UTF-8 or holds NUL:
see ``split_messages``).  No message can stop the client: one that is not a readable JSON object
(not JSON, too deep, not an object, not UTF-8) is handed on with an empty placeholder message
and its raw text, for the store to keep (quarantined).

With the ack extension (ingest/bayeux_ack.py), a batch is acknowledged only once its callback
*returned*: one whose callback raised, or that never arrived, is sent again by the server within
the same server session.  The response bodies and advice: ingest/bayeux_messages.py; the HTTP
requests: ingest/bayeux_transport.py.

Session events go to ``on_event`` (ingest/bayeux_events.py): where messages may be missing.

Errors: a 402 error (whatever its text) or ``reconnect: handshake`` advice → handshake and
subscribe again, never just retry; ``reconnect: none`` → stop (``BayeuxError``); a TLS
certificate the client does not accept → stop at once (``BayeuxError`` naming the problem);
transport errors, HTTP 5xx and unreadable responses (a body that is not an array of messages)
→ exponential backoff with full jitter, and after UNREADABLE_LIMIT unreadable responses in a
row a new session (the body of the last is handed on first, with the placeholder); a
callback that raises → the same connect again soon, without acknowledging (the session must
stay alive: servers drop a session that sends no connect within maxInterval, 10 s by default).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Self

import aiohttp

from .bayeux_ack import AckExtension
from .bayeux_events import OnEvent, SessionEvents
from .bayeux_messages import Advice, Message, is_402, placeholder, reply_to
from .bayeux_transport import BayeuxError, OnHttpError, Retry, Transport, Unreadable, full_jitter

log = logging.getLogger(__name__)

OnBatch = Callable[[list[Message]], Awaitable[None]]
# How soon the same connect is sent again after the callback failed (seconds, at most).
CALLBACK_RETRY_CAP = 1.0
# Unreadable responses in a row after which the session is given up for a new one (see _exchange).
UNREADABLE_LIMIT = 3


class _CallbackFailed(Retry):
    """on_batch raised: connect again soon without acknowledging, in the same session."""


class _Rehandshake(Exception):
    """The server no longer knows this client: handshake and subscribe again."""


class _Stopped(Exception):
    """stop() was called: end the loop before the next request."""


class BayeuxClient:
    """One Bayeux client session: ``async with BayeuxClient(...) as client: ...`` starts it in
    the background and stops it on exit; or ``await client.run()`` in the foreground.

    ``on_batch(messages)`` receives each response's non-meta messages; it should return only
    once they are safe (committed): that is when their batch is acknowledged.  ``on_event``
    receives the SessionEvents (see the module docstring).

    ``session``: an aiohttp.ClientSession to use (not closed here; give it a cookie jar with
    ``unsafe=True`` for IP-address hosts); by default the client makes and closes its own, so
    each client keeps its own cookies (BAYEUX_BROWSER, JSESSIONID).  ``auth`` (a BasicAuth or a
    (login, password) pair) and ``headers()`` go on every request; ``ssl`` (an SSLContext) and
    ``proxy`` (a URL) on every request too.  ``on_http_error(status, body)`` sees every non-200
    answer and returns truthy to have the request retried after a backoff (e.g. once it has
    refreshed a CSRF token).

    Counters, plain attributes for metrics: ``handshakes``, ``reconnects`` (sessions or
    connections re-established after a loss), ``failures``, ``callback_failures``,
    ``messages_received`` (redeliveries included), ``last_message_at`` (epoch seconds);
    ``connected`` and ``connected_since`` (epoch seconds of the last change of ``connected``).
    """

    def __init__(self, url: str, channels: Sequence[str], on_batch: OnBatch, *,
                 session: aiohttp.ClientSession | None = None,
                 auth: aiohttp.BasicAuth | tuple[str, str] | None = None,
                 headers: Callable[[], Mapping[str, str]] | None = None,
                 on_http_error: OnHttpError | None = None, on_event: OnEvent | None = None,
                 ssl: ssl.SSLContext | None = None, proxy: str | None = None,
                 ack: bool = True, backoff_base: float = 0.5, backoff_cap: float = 30.0,
                 max_failures: int | None = None, network_delay: float = 10.0,
                 rng: random.Random | None = None):
        self.url, self.channels, self._on_batch = url, list(channels), on_batch
        self._events = SessionEvents(on_event)
        self._transport = Transport(url, session=session, auth=auth, headers=headers, on_http_error=on_http_error,
                                    ssl=ssl, proxy=proxy)
        self._where = self._transport.where  # for logs: never credentials
        self._ack = AckExtension(ack)
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.max_failures, self.network_delay, self._rng = max_failures, network_delay, rng
        self.advice = Advice()
        self.client_id: str | None = None
        self.error: BaseException | None = None
        self.handshakes = self.reconnects = self.failures = self.callback_failures = 0
        self.messages_received = 0
        self.last_message_at: float | None = None
        self.connected_since = time.time()
        self._held: list[tuple[list[Message], int | None]] = []  # received before "started" was told
        self._connected = False   # the last connect succeeded: the next one may be held by the server
        self._recovering = False  # a loss happened since the last successful connect
        self._handshake_at = 0.0
        self._next_id = 0
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._unreadable = 0      # unreadable responses in a row

    @property
    def where(self) -> str:
        """The server URL without credentials (for logs and status)."""
        return self._where

    @property
    def ack_enabled(self) -> bool:
        """The server granted the ack extension to the current session."""
        return self._ack.enabled

    @property
    def connected(self) -> bool:
        """The last /meta/connect succeeded."""
        return self._connected

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    def start(self) -> asyncio.Task:
        """Run the client in a background task (idempotent); returns the task."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"bayeux {self._where}")
        return self._task

    async def wait(self) -> None:
        """Wait until the client ends; raises what ended it (BayeuxError), if anything."""
        await self.start()

    async def run(self) -> None:
        """Handshake, subscribe and long-poll until ``stop()``; raises BayeuxError when the
        client cannot go on."""
        self._task = self._task or asyncio.current_task()
        self._transport.open()
        failures, need_handshake = 0, True
        try:
            while not self._stopping.is_set():
                try:
                    if need_handshake:
                        await self._handshake()
                        await self._subscribe()
                        need_handshake = False
                        await self._start_following()
                    await self._connect()
                    failures = 0
                except (_Rehandshake, Retry) as exc:
                    rehandshake = isinstance(exc, _Rehandshake)
                    need_handshake = need_handshake or rehandshake
                    delay = self.advice.interval / 1000
                    # Losing a live session is routine; anything else, including a session lost
                    # again before its first successful connect, is a failure: back off.
                    if not (rehandshake and self._connected):
                        failures += 1
                        self.failures += 1
                        if self.max_failures is not None and failures > self.max_failures:
                            raise BayeuxError(f"{failures} failures in a row, the last: {exc}") from exc
                        delay = max(delay, full_jitter(failures - 1, self.backoff_base,
                                                       self.backoff_cap, self._rng))
                        if isinstance(exc, _CallbackFailed):
                            delay = min(delay, CALLBACK_RETRY_CAP)
                    if rehandshake:
                        await self._lose(str(exc))
                    elif not self.ack_enabled and not (isinstance(exc, Retry) and exc.answered):
                        # Without the ack extension, a reply lost on the way (or not stored) is
                        # not sent again.
                        await self._lose(f"{exc} (no ack extension: what that reply carried is not sent again)")
                    self._set_connected(False)
                    self._recovering = True
                    log.warning("Bayeux %s: %s; %s in %.3f s", self._where, exc,
                                "handshake again" if rehandshake else f"retry {failures}", delay)
                    await self._pause(delay)
        except (_Stopped, asyncio.CancelledError):
            if not self._stopping.is_set():
                raise
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.uncancel()  # stop() cut a wait short: a normal end
        except Exception as exc:
            self.error = exc
            log.error("Bayeux %s: client stopped: %s", self._where, exc)
            await self._lose(str(exc))
            raise
        finally:
            self._set_connected(False)
        log.info("Bayeux %s: client stopped", self._where)

    async def stop(self) -> None:
        """Stop: cut a pending long poll or pause short (a running callback finishes first),
        send /meta/disconnect, close the HTTP session if the client made it.  Never raises
        what ended the loop (see ``error`` and ``wait()``)."""
        self._stopping.set()
        task = self._task
        if task is not None and task is not asyncio.current_task() and not task.done():
            if self._transport.waiting:
                task.cancel()
            await asyncio.wait([task])
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved here, kept in self.error
        if self.client_id is not None and self._transport.usable:
            client_id, self.client_id = self.client_id, None
            try:
                await self._transport.post([self._message("/meta/disconnect", clientId=client_id)], self.network_delay)
                log.info("Bayeux %s: disconnected", self._where)
            except (Retry, BayeuxError) as exc:
                log.warning("Bayeux %s: disconnect failed: %s", self._where, exc)
            await self._events.end(client_id, self.ack_enabled)
        await self._transport.close()

    # -- session events ----------------------------------------------------------------------

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected, self.connected_since = connected, time.time()

    async def _lose(self, cause: str) -> None:
        """Tell that the started session is gone (once)."""
        await self._events.lose(self.client_id or "", self.ack_enabled, cause)

    async def _start_following(self) -> None:
        """After a subscription: tell "started", then hand on what came with the handshake and
        subscription replies (servers may deliver there without the ack extension)."""
        try:
            await self._events.start(self.client_id or "", self.ack_enabled, self._handshake_at)
        except Exception as exc:
            # Nothing of this session may be handed on before its start is recorded.
            log.exception("Bayeux %s: on_event(started) failed", self._where)
            raise _Rehandshake(f"recording the session start failed: {exc!r}") from exc
        held, self._held = self._held, []
        for batch, number in held:
            await self._deliver(batch, number)

    # -- the protocol ------------------------------------------------------------------------

    def _message(self, channel: str, **fields: Any) -> dict[str, Any]:
        self._next_id += 1
        return {"channel": channel, "id": str(self._next_id), **fields}

    async def _handshake(self) -> None:
        self.client_id, self._held = None, []
        self.advice = Advice()  # a new session starts from default advice
        message = self._message("/meta/handshake", version="1.0", minimumVersion="1.0",
                                supportedConnectionTypes=["long-polling"])
        self._ack.on_handshake(message)
        self._handshake_at = time.time()
        [reply] = await self._exchange(message)  # alone in its request: servers refuse company
        if not reply.get("successful"):
            if self.advice.reconnect == "none":
                raise BayeuxError(f"handshake refused: {reply.get('error')}")
            raise Retry(f"handshake unsuccessful: {reply.get('error')}")
        if not isinstance(reply.get("clientId"), str) or not reply["clientId"]:
            raise Retry(f"handshake reply without a clientId: {str(reply)[:200]}")
        self.client_id = reply["clientId"]
        self._ack.on_handshake_reply(reply)
        self.handshakes += 1
        log.info("Bayeux %s: handshake %d done (client %s..., ack extension %s)", self._where,
                 self.handshakes, self.client_id[:8], "on" if self.ack_enabled else "off")

    async def _subscribe(self) -> None:
        messages = [self._message("/meta/subscribe", clientId=self.client_id, subscription=channel)
                    for channel in self.channels]
        replies = await self._exchange(*messages)
        for message, reply in zip(messages, replies, strict=True):
            if not reply.get("successful"):
                if is_402(reply) or self.advice.reconnect == "handshake":
                    raise _Rehandshake(reply.get("error"))
                raise BayeuxError(f"subscription to {message['subscription']} refused: {reply.get('error')}")
        log.info("Bayeux %s: subscribed to %s", self._where, ", ".join(self.channels))

    async def _connect(self) -> None:
        message = self._message("/meta/connect", clientId=self.client_id, connectionType="long-polling")
        if not self._connected:
            # As CometD's clients do: after a handshake or a failure the server answers at once
            # (with fresh advice) instead of holding the request.
            message["advice"] = {"timeout": 0}
        self._ack.on_connect(message)
        [reply] = await self._exchange(message, timeout=self.advice.timeout / 1000 + self.network_delay)
        if not reply.get("successful"):
            if is_402(reply) or self.advice.reconnect == "handshake":
                raise _Rehandshake(reply.get("error") or "reconnect advice: handshake")
            if self.advice.reconnect == "none":
                raise BayeuxError(f"connect refused: {reply.get('error')}")
            raise Retry(f"connect unsuccessful: {reply.get('error')}")
        if self.advice.reconnect == "handshake":
            raise _Rehandshake("reconnect advice: handshake")
        if self.advice.reconnect == "none" or self.advice.interval < 0:
            raise BayeuxError("the server advised not to reconnect")
        # Without the ack extension a failed connect was told as "lost"; when the same session
        # answers again, following goes on, from now.
        await self._events.resume(self.client_id or "", self.ack_enabled)
        if not self._connected:
            log.info("Bayeux %s: connected", self._where)
            self._set_connected(True)
        if self._recovering:
            self.reconnects, self._recovering = self.reconnects + 1, False
        # At least the advised interval between the end of a response and the next connect.
        loop = asyncio.get_running_loop()
        await self._pause(self._transport.answered_at + self.advice.interval / 1000 - loop.time())

    async def _exchange(self, *messages: dict, timeout: float | None = None) -> list[dict]:
        """Send messages in one request, hand on the response's non-meta messages, take the
        advice of the replies and return the reply to each message."""
        if self._stopping.is_set():
            raise _Stopped
        try:
            received = await self._transport.post(list(messages), timeout or self.network_delay)
        except Unreadable as exc:
            await self._unreadable_again(messages[0]["channel"], exc)
            raise
        self._unreadable = 0
        replies = []
        for message in messages:
            reply = reply_to(message, received)
            if reply is None:
                raise Retry(f"no reply to {message['channel']}")
            advice = Advice.from_message(reply.get("advice"))
            if advice is not None and advice != self.advice:
                log.info("Bayeux %s: advice %s%s", self._where, advice,
                         ", several clients share these cookies" if reply["advice"].get("multiple-clients") else "")
                self.advice = advice
            replies.append(reply)
        batch = self._ack.batch_of(replies[0])
        channel = messages[0]["channel"]
        delivered = [(m, raw) for m, raw in received if not str(m.get("channel", "")).startswith("/meta/")]
        if channel in ("/meta/handshake", "/meta/subscribe"):
            self._held.append((delivered, batch))  # handed on once "started" is told
        else:
            await self._deliver(delivered, batch)
        return replies

    async def _deliver(self, batch: list[Message], number: int | None) -> None:
        if batch:
            self.messages_received += len(batch)
            self.last_message_at = time.time()
            try:
                await self._on_batch(batch)
            except Exception as exc:
                self.callback_failures += 1
                log.warning("Bayeux %s: on_batch failed for %d messages (%r); %s", self._where, len(batch), exc,
                            "not acknowledged, the server will send them again" if number is not None
                            else "no ack extension: the server will not send them again")
                raise _CallbackFailed(f"on_batch failed: {exc!r}") from exc
        self._ack.acknowledge(number)  # sent back with the next connect

    async def _unreadable_again(self, channel: str, exc: Unreadable) -> None:
        """Count an unreadable response; at the UNREADABLE_LIMIT-th in a row, give the session
        up: with the ack extension the server would send the same batch (and so, most likely,
        the same unreadable body) again forever.  The body of a connect in a started session is
        handed on first, as one message with the placeholder, so that the store keeps it
        (quarantined); a new session then starts empty (what the server queued for this one is
        lost, and "lost" says from when)."""
        self._unreadable += 1
        if self._unreadable < UNREADABLE_LIMIT:
            return
        if channel == "/meta/connect" and self._events.following and exc.text.strip(" \t\n\r"):
            await self._deliver([(placeholder(), exc.text)], None)
        self._unreadable = 0
        raise _Rehandshake(f"{UNREADABLE_LIMIT} unreadable responses in a row, the last: {exc}") from exc

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless stop() is called first."""
        if seconds > 0 and not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), seconds)
            except TimeoutError:
                pass


