"""The HTTP side of one GWS user: its own aiohttp session (cookie jar: ``JSESSIONID``,
``BAYEUX_BROWSER``), HTTP Basic auth, TLS settings and proxy, and the CSRF token.

Where the server enables CSRF protection, ``GET /api/v2/me`` answers ``X-CSRF-HEADER: <header
name>`` and ``X-CSRF-TOKEN: <value>``; the value goes under that header name on every POST from
then on (``csrf``, given to the Bayeux client as its headers), and a 403 "Missing or invalid Csrf
token" fetches it again and retries.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from ..gws_protocol import CSRF_HEADER_NAME_HEADER, CSRF_REFUSED, CSRF_TOKEN_HEADER, ME_PATH
from .bayeux_transport import basic_authorization, request_options
from .config import SessionConfig

logger = logging.getLogger(__name__)


class GwsHttp:
    """One GWS user's HTTP: ``get()`` a resource, ``csrf`` headers for POSTs, ``on_http_error``
    for the Bayeux client.  Made inside the event loop (the aiohttp session is made here);
    ``close()`` at the end."""

    def __init__(self, config: SessionConfig):
        self.config = config
        self.ssl = config.ssl_context()
        self.proxy = config.proxy
        self.csrf: dict[str, str] = {}  # {header name: token}, once the server told one
        self.csrf_fetches = 0
        self.network_delay = 10.0  # seconds a GET of the user resource may take (the Bayeux client's)
        self._request_options = request_options(self.ssl, config.proxy)
        # A cookie jar of its own, accepting cookies from IP hosts; trust_env: HTTPS_PROXY,
        # HTTP_PROXY and NO_PROXY apply unless a proxy is given.
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), trust_env=True)
        self._authorization = basic_authorization((config.user, config.password)) or ""

    @property
    def source(self) -> str:
        return self.config.source_name

    async def close(self) -> None:
        await self.session.close()

    async def get(self, path: str, timeout: float) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """GET a GWS resource as this user: (status, headers, body); aiohttp's errors raise."""
        async with self.session.get(URL(self.config.url(path), encoded=True),  # keeps "fields=*" as it is
                                    headers={"Authorization": self._authorization},
                                    timeout=aiohttp.ClientTimeout(total=timeout), **self._request_options) as response:
            return response.status, response.headers, await response.read()

    async def fetch_csrf(self) -> None:
        """Ask ``GET /api/v2/me`` for the CSRF token (a server without one answers no header, or
        404); failures are logged, never raised: the Bayeux client meets them too, and says why."""
        try:
            status, headers, _ = await self.get(ME_PATH, self.network_delay)
        except aiohttp.ClientSSLError:
            return  # the Bayeux client meets the same error and stops, saying why
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            logger.warning("GWS %s (%s): GET %s failed: %s", self.source, self.config.user, ME_PATH, exc)
            return
        self.csrf_fetches += 1
        header, token = headers.get(CSRF_HEADER_NAME_HEADER), headers.get(CSRF_TOKEN_HEADER)
        if status == 200 and header and token:
            self.csrf = {header: token}
            logger.info("GWS %s: CSRF token received (header %s)", self.source, header)
        elif status not in (200, 404):  # 404: a server without /api/v2/me (no CSRF either)
            logger.warning("GWS %s: GET %s answered HTTP %d", self.source, ME_PATH, status)

    async def on_http_error(self, status: int, body: str) -> bool:
        """For the Bayeux client: a refused CSRF token is fetched again (retry); a 401 is said
        plainly (no retry)."""
        if status == 403 and CSRF_REFUSED in body.lower():
            logger.info("GWS %s: CSRF token refused; fetching a new one", self.source)
            await self.fetch_csrf()
            return True
        if status == 401:
            logger.error("GWS %s: HTTP 401: user %s was refused (check the password)", self.source,
                         self.config.user)
        return False

    def client_options(self) -> dict[str, Any]:
        """The Bayeux client's keyword arguments for requests as this user."""
        return {"session": self.session, "auth": (self.config.user, self.config.password),
                "headers": lambda: self.csrf, "on_http_error": self.on_http_error,
                "ssl": self.ssl, "proxy": self.proxy}
