"""The HTTP side of a Bayeux client: one POST of a JSON array of messages, its answer parsed, and
what can go wrong with it sorted into "try again" (Retry) and "cannot go on" (BayeuxError).

It holds no session state (client id, advice, acknowledgements: ingest/bayeux.py) and knows
nothing of the store.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import random
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from yarl import URL

from .bayeux_messages import Message, decode_body, split_messages

# on_http_error(status, body) -> truthy to retry (after a backoff); may be a coroutine function.
OnHttpError = Callable[[int, str], Any]

_RETRYABLE_STATUS = {408, 429}


class BayeuxError(Exception):
    """The client cannot go on: reconnect advice ``none``, a refused subscription, an HTTP
    error nobody asked to retry, or more consecutive failures than ``max_failures``."""


class Retry(Exception):
    """A failure worth trying again after a backoff (transport, HTTP 5xx).  ``answered``: the
    server answered (with an HTTP error), so the request delivered nothing."""

    def __init__(self, message: str, answered: bool = False):
        super().__init__(message)
        self.answered = answered


class Unreadable(Retry):
    """A 200 response whose body is not an array of messages (``text``: the body as text)."""

    def __init__(self, message: str, text: str):
        super().__init__(message)  # what the reply carried is lost, as with a transport error
        self.text = text


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


class Transport:
    """POSTs to one Bayeux URL with one aiohttp session (``session``, or one made by ``open()``
    and closed by ``close()``), the ``auth`` and ``headers()`` on every request, and TLS
    settings and proxy.  ``on_http_error(status, body)`` sees every non-200 answer and returns
    truthy to have the request retried.  ``waiting``: a request is in flight (where a stop may
    cut in); ``answered_at``: the loop time the last response ended."""

    def __init__(self, url: str, *, session: aiohttp.ClientSession | None = None,
                 auth: aiohttp.BasicAuth | tuple[str, str] | None = None,
                 headers: Callable[[], Mapping[str, str]] | None = None,
                 on_http_error: OnHttpError | None = None, ssl: ssl.SSLContext | None = None,
                 proxy: str | None = None):
        self.url = url
        self.where = str(URL(url).with_user(None))  # for logs: never credentials
        self.session, self._owns_session = session, session is None
        self._authorization = basic_authorization(auth)
        self._headers, self._on_http_error = headers, on_http_error
        self._request_options = request_options(ssl, proxy)
        self.waiting = False
        self.answered_at = 0.0

    def open(self) -> aiohttp.ClientSession:
        """The session, made now (with its own cookie jar) when none was given."""
        if self.session is None:
            self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        return self.session

    @property
    def usable(self) -> bool:
        return self.session is not None and not self.session.closed

    async def close(self) -> None:
        """Close the session if this transport made it."""
        if self._owns_session and self.session is not None:
            await self.session.close()

    async def post(self, messages: list[dict], timeout: float) -> list[Message]:
        """The one place requests are made: POST a JSON array, return the parsed response."""
        headers = {"Content-Type": "application/json;charset=UTF-8"}
        if self._authorization:
            headers["Authorization"] = self._authorization
        if self._headers is not None:
            headers.update(self._headers())
        self.waiting = True
        try:
            async with self.open().post(self.url, data=json.dumps(messages), headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=timeout),
                                          **self._request_options) as response:
                status, body = response.status, await response.read()
        except aiohttp.ClientSSLError as exc:
            # A certificate the client does not accept (or a TLS set-up that cannot work) does
            # not get better by retrying: stop, saying what is wrong.
            raise BayeuxError(f"TLS with {self.where} failed: {tls_problem(exc)}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Retry(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.waiting = False
        self.answered_at = asyncio.get_running_loop().time()
        if status != 200:
            text = body.decode("utf-8", "replace")
            retry = None
            if self._on_http_error is not None:
                retry = self._on_http_error(status, text)
                if inspect.isawaitable(retry):
                    retry = await retry
            if retry or status >= 500 or status in _RETRYABLE_STATUS:
                raise Retry(f"HTTP {status}", answered=True)
            raise BayeuxError(f"HTTP {status} from {self.where}: {text[:200]}")
        try:
            return split_messages(body)  # never fails for a message: see split_messages
        except ValueError as exc:
            raise Unreadable(f"unreadable response: {exc}", decode_body(body)) from exc


def tls_problem(exc: aiohttp.ClientSSLError) -> str:
    """What is wrong, in words: the verification error of a refused certificate (e.g.
    "certificate verify failed: self-signed certificate in certificate chain"), else the
    TLS error itself."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        return (f"certificate verify failed: {getattr(error, 'verify_message', None) or error}: the server's "
                "certificate is not trusted (give the CA that signed it with --ca-file)")
    return str(getattr(exc, "os_error", None) or exc)
