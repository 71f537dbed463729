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

With the ack extension (the server answers the handshake with ``ext.ack: true``, or with
``{"enabled": true, "batch": N}`` as the Java server does when it delivers during the handshake)
every connect reply numbers its batch in ``ext.ack``, and the next connect sends back the number
of the last batch whose callback *returned*: a batch whose callback raised, or that never
arrived, is sent again by the server within the same server session.  The queue of a server
session dies with it: nothing published while no session existed is ever delivered.

Session events go to ``on_event`` (awaited, in order with the batches), so that a caller can
record where messages may be missing: ``started`` after each successful handshake and
subscription, before any message of that session is handed on; ``lost`` when a session that had
started is known to be gone (402, handshake advice, a refused connect, or, without the ack
extension, a failed connect: the messages of a lost reply are gone), with ``since`` the last
moment it was known to be followed; ``resumed`` when, without the ack extension, the same
session answers again after such a failure; ``ended`` after a clean ``/meta/disconnect``.

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
import base64
import inspect
import json
import logging
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import aiohttp
from yarl import URL

from ..notifications import decode_text

log = logging.getLogger(__name__)

Message = tuple[dict[str, Any], str]
OnBatch = Callable[[list[Message]], Awaitable[None]]
# on_http_error(status, body) -> truthy to retry (after a backoff); may be a coroutine function.
OnHttpError = Callable[[int, str], Any]
# How soon the same connect is sent again after the callback failed (seconds, at most).
CALLBACK_RETRY_CAP = 1.0
# Unreadable responses in a row after which the session is given up for a new one (see _exchange).
UNREADABLE_LIMIT = 3


@dataclass(frozen=True)
class SessionEvent:
    """A change in what the client follows (times are epoch seconds)."""

    kind: str  # "started" | "resumed" | "lost" | "ended"
    client_id: str
    at: float
    ack: bool = False  # the ack extension is on for this session
    handshake_at: float | None = None  # started: when the handshake request was sent
    since: float | None = None  # lost: the last moment the session was known to be followed
    cause: str | None = None  # lost, resumed: what happened


OnEvent = Callable[[SessionEvent], Awaitable[None]]

_RETRYABLE_STATUS = {408, 429}


class BayeuxError(Exception):
    """The client cannot go on: reconnect advice ``none``, a refused subscription, an HTTP
    error nobody asked to retry, or more consecutive failures than ``max_failures``."""


class _Retry(Exception):
    """A failure worth trying again after a backoff (transport, HTTP 5xx).  ``answered``: the
    server answered (with an HTTP error), so the request delivered nothing."""

    def __init__(self, message: str, answered: bool = False):
        super().__init__(message)
        self.answered = answered


class _Unreadable(_Retry):
    """A 200 response whose body is not an array of messages (``text``: the body as text)."""

    def __init__(self, message: str, text: str):
        super().__init__(message)  # what the reply carried is lost, as with a transport error
        self.text = text


class _CallbackFailed(_Retry):
    """on_batch raised: connect again soon without acknowledging, in the same session."""


class _Rehandshake(Exception):
    """The server no longer knows this client: handshake and subscribe again."""


class _Stopped(Exception):
    """stop() was called: end the loop before the next request."""


@dataclass(frozen=True)
class Advice:
    """Bayeux advice; ``interval`` and ``timeout`` are milliseconds."""

    reconnect: str = "retry"
    interval: int = 0
    timeout: int = 30_000

    @classmethod
    def from_message(cls, advice: Any) -> Advice | None:
        """The advice a message carries, missing fields at their defaults (as CometD's own
        clients do), or None when it carries none."""
        if not isinstance(advice, dict):
            return None
        default = cls()
        try:
            return cls(str(advice.get("reconnect", default.reconnect)),
                       int(advice.get("interval", default.interval)),
                       int(advice.get("timeout", default.timeout)))
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
            return None  # malformed advice: keep the current one


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# The lenient splitter's steps: the next character that matters at the top level of an element
# (a string, a bracket or a comma), the next one inside it (commas do not matter there), and the
# rest of a string after its opening quote (any character after a backslash is skipped).
_TOP = re.compile(r'["\[\]{},]')
_INNER = re.compile(r'["\[\]{}]')
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def placeholder() -> dict[str, Any]:
    """The message handed on for an element that is not a readable JSON object: no channel, so
    it is a delivery, and its raw text is what the store keeps (and quarantines)."""
    return {}


def decode_body(body: bytes) -> str:
    """A response body as text: UTF-8, as JSON is (RFC 8259).  A body that is not UTF-8 loses
    nothing: each byte that is not is kept as the four characters ``\\xNN`` (backslashreplace),
    so the text is still storable.  ``\\x`` is no JSON escape, so a message holding such a byte is
    no longer valid JSON: it is handed on with the placeholder and stored quarantined, with its
    text as received but for those bytes (its ``raw_text.encode()`` is then not its bytes).
    A NUL (never valid in JSON text) is kept as the four characters ``\x00``, as for a file line."""
    return decode_text(body)[0]


def split_messages(body: str | bytes) -> list[Message]:
    """Parse a Bayeux response body (a JSON array of messages, or a single message) into
    ``(message, raw_text)`` pairs, ``raw_text`` being the message's exact slice of the text
    (bytes are decoded by ``decode_body``).

    No message can make this fail: an element of the array that is not a readable JSON object
    (not JSON, nested deeper than the decoder goes, not an object: ``42``, ``"text"``) is handed
    on as ``(placeholder(), raw_text)``, so that the store keeps it (quarantined) and the
    session goes on.  The normal path decodes the whole body at once; only when that fails does
    an iterative splitter find each element's text (tracking strings, escapes and bracket
    depth, without recursion: any depth) and decode each alone.  There, a NUL character (never
    valid in JSON text) is kept as the four characters ``\\x00``, as PostgreSQL text cannot hold
    NUL.  ``NaN`` and ``Infinity`` are accepted as numbers here (Python's decoder): the store's
    own classification of the raw text decides about them.

    Raises ValueError when the body itself is not an array of elements (not JSON at the top, an
    array that does not end, data after it): then no element can be told apart.
    """
    text = decode_body(body) if isinstance(body, bytes) else body
    try:
        items = _split(text)
    except (ValueError, RecursionError):
        items = _split_leniently(text.replace("\x00", "\\x00"))
    if not all(isinstance(message, dict) for message, _ in items):
        items = [(message if isinstance(message, dict) else placeholder(), raw) for message, raw in items]
    return items


def _split(text: str) -> list[tuple[Any, str]]:
    """The normal path: the whole body with the C decoder."""
    def skip(pos: int) -> int:
        return _WHITESPACE.match(text, pos).end()

    items: list[tuple[Any, str]] = []
    pos = skip(0)
    if text.startswith("{", pos):  # the spec lets a server send one message bare
        message, end = _DECODER.raw_decode(text, pos)
        items.append((message, text[pos:end]))
        pos = end
    elif not text.startswith("[", pos):
        raise ValueError("the response is not a JSON array")
    elif text.startswith("]", pos := skip(pos + 1)):
        pos += 1
    else:
        while True:
            message, end = _DECODER.raw_decode(text, pos)
            items.append((message, text[pos:end]))
            pos = skip(end)
            if text.startswith(",", pos):
                pos = skip(pos + 1)
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise ValueError(f"expected ',' or ']' at offset {pos}")
    if skip(pos) != len(text):
        raise ValueError(f"unexpected data at offset {pos}")
    return items


def _element_end(text: str, pos: int) -> int:
    """The offset of the ``,`` or ``]`` that ends the array element starting at ``pos`` (outside
    strings, at depth 0), or ``len(text)`` when the text ends first.  Iterative, so any depth;
    brackets are counted, not matched ("[}" closes as well: that element then fails to decode)."""
    depth = 0
    while True:
        found = (_INNER if depth else _TOP).search(text, pos)
        if found is None:
            return len(text)
        char, pos = found.group(), found.end()
        if char == '"':
            rest = _STRING_REST.match(text, pos)
            if rest is None:
                return len(text)  # a string that does not end
            pos = rest.end()
        elif char in "[{":
            depth += 1
        elif depth:
            depth -= 1
        elif char != "}":  # "," or "]" at depth 0; a stray "}" there is part of a broken element
            return found.start()


def _decode_element(raw: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return placeholder()


def _split_leniently(text: str) -> list[tuple[Any, str]]:
    """The fallback: each element's text found without decoding, then decoded alone."""
    def skip(pos: int) -> int:
        return _WHITESPACE.match(text, pos).end()

    pos = skip(0)
    if text.startswith("{", pos):  # a bare message that does not decode: the whole text is it
        raw = text[pos:].rstrip(" \t\n\r")
        return [(_decode_element(raw), raw)]
    if not text.startswith("[", pos):
        raise ValueError("the response is not a JSON array")
    items: list[tuple[Any, str]] = []
    pos = skip(pos + 1)
    while not text.startswith("]", pos):
        end = _element_end(text, pos)
        if end == len(text):
            raise ValueError(f"the response's array does not end (element at offset {pos})")
        raw = text[pos:end].rstrip(" \t\n\r")
        if raw:  # nothing between two commas: nothing to keep
            items.append((_decode_element(raw), raw))
        pos = end if text[end] == "]" else skip(end + 1)
    if skip(pos + 1) != len(text):
        raise ValueError(f"unexpected data at offset {pos + 1}")
    return items


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): uniform in
    [0, min(cap, base * 2**attempt)] ("full jitter": clients that failed together spread out)."""
    return (rng or random).uniform(0.0, min(cap, base * 2.0 ** min(attempt, 60)))


def basic_authorization(auth: aiohttp.BasicAuth | tuple[str, str] | None) -> str | None:
    # The header is built here: aiohttp 3.14 deprecates its own ``auth=`` request argument.
    if auth is None:
        return None
    if isinstance(auth, tuple):
        return "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
    return auth.encode()


def request_options(context: ssl.SSLContext | None, proxy: str | None) -> dict[str, Any]:
    """The keyword arguments of an aiohttp request for these TLS settings and proxy (no
    ``ssl`` at all when there are none: aiohttp's default verification then applies)."""
    return {"proxy": proxy} if context is None else {"proxy": proxy, "ssl": context}


def _is_402(reply: dict) -> bool:
    # Servers word it differently ("402::Unknown client", "402::session_unknown"): the code decides.
    return str(reply.get("error") or "").startswith("402")


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
        self.url, self.channels, self._on_batch, self._on_event = url, list(channels), on_batch, on_event
        self._where = str(URL(url).with_user(None))  # for logs: never credentials
        self._session, self._owns_session = session, session is None
        self._authorization = basic_authorization(auth)
        self._headers, self._on_http_error = headers, on_http_error
        self._request_options = request_options(ssl, proxy)
        self.ack, self.backoff_base, self.backoff_cap = ack, backoff_base, backoff_cap
        self.max_failures, self.network_delay, self._rng = max_failures, network_delay, rng
        self.advice = Advice()
        self.client_id: str | None = None
        self.ack_enabled = False
        self.error: BaseException | None = None
        self.handshakes = self.reconnects = self.failures = self.callback_failures = 0
        self.messages_received = 0
        self.last_message_at: float | None = None
        self.connected_since = time.time()
        self._acked = -1          # last batch handed safely to on_batch; -1: none yet (as CometD's AckExtension)
        self._held: list[tuple[list[Message], int | None]] = []  # received before "started" was told
        self._connected = False   # the last connect succeeded: the next one may be held by the server
        self._recovering = False  # a loss happened since the last successful connect
        self._started = False     # "started" was told for the current session, and no "lost" since
        self._followed_at = 0.0   # epoch seconds of the last answer proving the session alive
        self._handshake_at = 0.0
        self._next_id = 0
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._waiting = False     # the loop is in an HTTP request, where stop() may cut in
        self._answered_at = 0.0   # loop time the last response ended
        self._unreadable = 0      # unreadable responses in a row

    @property
    def where(self) -> str:
        """The server URL without credentials (for logs and status)."""
        return self._where

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
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
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
                except (_Rehandshake, _Retry) as exc:
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
                    elif not self.ack_enabled and not (isinstance(exc, _Retry) and exc.answered):
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
            if asyncio.current_task().cancelling():
                asyncio.current_task().uncancel()  # stop() cut a wait short: a normal end
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
            if self._waiting:
                task.cancel()
            await asyncio.wait([task])
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved here, kept in self.error
        if self.client_id is not None and self._session is not None and not self._session.closed:
            client_id, self.client_id = self.client_id, None
            try:
                await self._post([self._message("/meta/disconnect", clientId=client_id)], self.network_delay)
                log.info("Bayeux %s: disconnected", self._where)
            except (_Retry, BayeuxError) as exc:
                log.warning("Bayeux %s: disconnect failed: %s", self._where, exc)
            if self._started:
                self._started = False
                await self._tell(SessionEvent("ended", client_id, time.time(), self.ack_enabled,
                                              cause="the client stopped (/meta/disconnect)"))
        if self._owns_session and self._session is not None:
            await self._session.close()

    # -- session events ----------------------------------------------------------------------

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected, self.connected_since = connected, time.time()

    async def _tell(self, event: SessionEvent) -> None:
        if self._on_event is not None:
            await self._on_event(event)

    async def _lose(self, cause: str) -> None:
        """Tell that the started session is gone (once)."""
        if self._started:
            self._started = False
            await self._tell(SessionEvent("lost", self.client_id or "", time.time(), self.ack_enabled,
                                          since=self._followed_at, cause=cause))

    async def _start_following(self) -> None:
        """After a subscription: tell "started", then hand on what came with the handshake and
        subscription replies (servers may deliver there without the ack extension)."""
        self._followed_at = time.time()
        event = SessionEvent("started", self.client_id or "", self._followed_at, self.ack_enabled,
                             handshake_at=self._handshake_at)
        try:
            await self._tell(event)
        except Exception as exc:
            # Nothing of this session may be handed on before its start is recorded.
            log.exception("Bayeux %s: on_event(started) failed", self._where)
            raise _Rehandshake(f"recording the session start failed: {exc!r}") from exc
        self._started = True
        held, self._held = self._held, []
        for batch, number in held:
            await self._deliver(batch, number)

    # -- the protocol ------------------------------------------------------------------------

    def _message(self, channel: str, **fields: Any) -> dict[str, Any]:
        self._next_id += 1
        return {"channel": channel, "id": str(self._next_id), **fields}

    async def _handshake(self) -> None:
        self.client_id, self.ack_enabled, self._acked, self._held = None, False, -1, []
        self.advice = Advice()  # a new session starts from default advice
        message = self._message("/meta/handshake", version="1.0", minimumVersion="1.0",
                                supportedConnectionTypes=["long-polling"])
        if self.ack:
            message["ext"] = {"ack": True}
        self._handshake_at = time.time()
        [reply] = await self._exchange(message)  # alone in its request: servers refuse company
        if not reply.get("successful"):
            if self.advice.reconnect == "none":
                raise BayeuxError(f"handshake refused: {reply.get('error')}")
            raise _Retry(f"handshake unsuccessful: {reply.get('error')}")
        if not isinstance(reply.get("clientId"), str) or not reply["clientId"]:
            raise _Retry(f"handshake reply without a clientId: {str(reply)[:200]}")
        self.client_id = reply["clientId"]
        ext = reply.get("ext")
        ack = ext.get("ack") if isinstance(ext, dict) else None
        # "true", or {"enabled": true, "batch": N} (Java AcknowledgedMessagesSessionExtension with
        # message delivery during the handshake: the reply closes batch N, acknowledged as any).
        self.ack_enabled = self.ack and (ack is True or (isinstance(ack, dict) and ack.get("enabled") is True))
        self.handshakes += 1
        log.info("Bayeux %s: handshake %d done (client %s..., ack extension %s)", self._where,
                 self.handshakes, self.client_id[:8], "on" if self.ack_enabled else "off")

    async def _subscribe(self) -> None:
        messages = [self._message("/meta/subscribe", clientId=self.client_id, subscription=channel)
                    for channel in self.channels]
        replies = await self._exchange(*messages)
        for message, reply in zip(messages, replies):
            if not reply.get("successful"):
                if _is_402(reply) or self.advice.reconnect == "handshake":
                    raise _Rehandshake(reply.get("error"))
                raise BayeuxError(f"subscription to {message['subscription']} refused: {reply.get('error')}")
        log.info("Bayeux %s: subscribed to %s", self._where, ", ".join(self.channels))

    async def _connect(self) -> None:
        message = self._message("/meta/connect", clientId=self.client_id, connectionType="long-polling")
        if not self._connected:
            # As CometD's clients do: after a handshake or a failure the server answers at once
            # (with fresh advice) instead of holding the request.
            message["advice"] = {"timeout": 0}
        if self.ack_enabled:
            message["ext"] = {"ack": self._acked}
        [reply] = await self._exchange(message, timeout=self.advice.timeout / 1000 + self.network_delay)
        if not reply.get("successful"):
            if _is_402(reply) or self.advice.reconnect == "handshake":
                raise _Rehandshake(reply.get("error") or "reconnect advice: handshake")
            if self.advice.reconnect == "none":
                raise BayeuxError(f"connect refused: {reply.get('error')}")
            raise _Retry(f"connect unsuccessful: {reply.get('error')}")
        if self.advice.reconnect == "handshake":
            raise _Rehandshake("reconnect advice: handshake")
        if self.advice.reconnect == "none" or self.advice.interval < 0:
            raise BayeuxError("the server advised not to reconnect")
        self._followed_at = time.time()
        if not self._started:
            # Without the ack extension a failed connect was told as "lost"; the same session
            # answers again: following goes on, from now.
            self._started = True
            await self._tell(SessionEvent("resumed", self.client_id or "", self._followed_at, self.ack_enabled,
                                          cause="the same session answered again"))
        if not self._connected:
            log.info("Bayeux %s: connected", self._where)
            self._set_connected(True)
        if self._recovering:
            self.reconnects, self._recovering = self.reconnects + 1, False
        # At least the advised interval between the end of a response and the next connect.
        loop = asyncio.get_running_loop()
        await self._pause(self._answered_at + self.advice.interval / 1000 - loop.time())

    async def _exchange(self, *messages: dict, timeout: float | None = None) -> list[dict]:
        """Send messages in one request, hand on the response's non-meta messages, take the
        advice of the replies and return the reply to each message."""
        if self._stopping.is_set():
            raise _Stopped
        try:
            received = await self._post(list(messages), timeout or self.network_delay)
        except _Unreadable as exc:
            await self._unreadable_again(messages[0]["channel"], exc)
            raise
        self._unreadable = 0
        replies = []
        for message in messages:
            reply = next((m for m, _ in received if m.get("channel") == message["channel"]
                          and m.get("id", message["id"]) == message["id"]), None)
            if reply is None:
                raise _Retry(f"no reply to {message['channel']}")
            advice = Advice.from_message(reply.get("advice"))
            if advice is not None and advice != self.advice:
                log.info("Bayeux %s: advice %s%s", self._where, advice,
                         ", several clients share these cookies" if reply["advice"].get("multiple-clients") else "")
                self.advice = advice
            replies.append(reply)
        batch = None
        channel = messages[0]["channel"]
        if self.ack_enabled or channel == "/meta/handshake":
            ext = replies[0].get("ext")
            batch = ext.get("ack") if isinstance(ext, dict) else None
            if isinstance(batch, dict):  # the handshake's object form
                batch = batch.get("batch")
            batch = batch if isinstance(batch, int) and not isinstance(batch, bool) else None
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
        if number is not None and self.ack_enabled:
            self._acked = number  # sent back with the next connect

    async def _post(self, messages: list[dict], timeout: float) -> list[Message]:
        """The one place requests are made: POST a JSON array, return the parsed response."""
        headers = {"Content-Type": "application/json;charset=UTF-8"}
        if self._authorization:
            headers["Authorization"] = self._authorization
        if self._headers is not None:
            headers.update(self._headers())
        self._waiting = True
        try:
            async with self._session.post(self.url, data=json.dumps(messages), headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=timeout),
                                          **self._request_options) as response:
                status, body = response.status, await response.read()
        except aiohttp.ClientSSLError as exc:
            # A certificate the client does not accept (or a TLS set-up that cannot work) does
            # not get better by retrying: stop, saying what is wrong.
            raise BayeuxError(f"TLS with {self._where} failed: {tls_problem(exc)}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._waiting = False
        self._answered_at = asyncio.get_running_loop().time()
        if status != 200:
            text = body.decode("utf-8", "replace")
            retry = None
            if self._on_http_error is not None:
                retry = self._on_http_error(status, text)
                if inspect.isawaitable(retry):
                    retry = await retry
            if retry or status >= 500 or status in _RETRYABLE_STATUS:
                raise _Retry(f"HTTP {status}", answered=True)
            raise BayeuxError(f"HTTP {status} from {self._where}: {text[:200]}")
        try:
            return split_messages(body)  # never fails for a message: see split_messages
        except ValueError as exc:
            raise _Unreadable(f"unreadable response: {exc}", decode_body(body)) from exc

    async def _unreadable_again(self, channel: str, exc: _Unreadable) -> None:
        """Count an unreadable response; at the UNREADABLE_LIMIT-th in a row, give the session
        up: with the ack extension the server would send the same batch (and so, most likely,
        the same unreadable body) again forever.  The body of a connect in a started session is
        handed on first, as one message with the placeholder, so that the store keeps it
        (quarantined); a new session then starts empty (what the server queued for this one is
        lost, and "lost" says from when)."""
        self._unreadable += 1
        if self._unreadable < UNREADABLE_LIMIT:
            return
        if channel == "/meta/connect" and self._started and exc.text.strip(" \t\n\r"):
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


def tls_problem(exc: aiohttp.ClientSSLError) -> str:
    """What is wrong, in words: the verification error of a refused certificate (e.g.
    "certificate verify failed: self-signed certificate in certificate chain"), else the
    TLS error itself."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        return (f"certificate verify failed: {getattr(error, 'verify_message', None) or error}: the server's "
                "certificate is not trusted (give the CA that signed it with --ca-file)")
    return str(getattr(exc, "os_error", None) or exc)
