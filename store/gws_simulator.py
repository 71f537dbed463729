"""A GWS-like server on loopback for demos, tests and benchmarks: ``workitem-store simulate-server``.

It plays the parts of Genesys Web Services (GWS 8.5: a Java CometD 3.1.x server behind GWS's
own HTTP layer) that an ingesting client meets, and copies each from a named source.  Java
CometD paths are those of the CometD repository at tag 3.1.9 (what GWS runs) unless they say
HEAD; "Node" is the CometD project's ``cometd-nodejs-server`` 1.2.1 (tests/cometd/node_modules).

HTTP (GWS API v2 documentation):

- HTTP Basic auth for simulated agents ``agent-001`` .. (one password for all).  Refused: HTTP
  401 with ``WWW-Authenticate`` and ``{"statusCode": 20, "statusMessage": "Access denied"}``
  (GWS "Interpreting a Response" and "Return Values" pages: status code 20, user not
  authenticated).
- CSRF (GWS CSRF protection): every GET answers ``X-CSRF-HEADER: X-CSRF-TOKEN`` and
  ``X-CSRF-TOKEN: <token>``, the token of the HTTP session of the ``JSESSIONID`` cookie (made at
  the first request); a POST without that token gets HTTP 403
  ``{"statusCode": 20, "statusMessage": "Missing or invalid Csrf token"}`` (the text is GWS's;
  its statusCode is not documented, 20 is this project's choice; clients look for "csrf token"
  in the body, case-insensitively).
- Other errors are GWS bodies too, ``{"statusCode": N, "statusMessage": ...}`` as
  application/json, with codes of the "Return Values" table (which HTTP status gets which code
  is chosen here: 2 invalid parameter for HTTP 400, 3 forbidden for 405, 4 internal error for
  500, 6 not found for 404).
- ``GET /api/v2/me`` and ``GET /api/v2/me/workitems?fields=*``: the agent's user resource and
  current workitems (store/gws_simulator_agents.py), the latter always what was published up to
  the moment of the GET (``current_workitems(agent)`` gives the same list in process).
- TLS when given an ``ssl_context`` (production GWS is https).

CometD (Bayeux 1.0, long-polling only) at ``POST /api/v2/notifications``: sessions, queues per
session, the ack extension, 402s and multiple-clients, as Java CometD behind GWS
(store/gws_simulator_cometd.py).

One publisher task walks the seeded ``store.simulate.Simulator`` stream (the same as
``workitem-store simulate --duplicate-rate 0`` with the same seed and agents), paced to ``rate``
notifications per second overall, and hands each message to its agent; with
``wait_for_sessions`` it starts only once every agent has a subscribed session.  Not copied from
GWS: which events happen (seeded simulation) and that an agent's notifications flow without a
StartContactCenterSession.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hmac
import logging
import secrets
import socket
import ssl
from typing import Self

from aiohttp import web

from .gws_protocol import (
    ACCESS_DENIED,
    CSRF_ERROR,
    CSRF_HEADER_NAME_HEADER,
    CSRF_TOKEN_HEADER,
    ME_PATH,
    ME_WORKITEMS_PATH,
    NOT_AUTHENTICATED,
    NOTIFICATIONS_PATH,
)
from .gws_simulator_agents import SimulatedAgent
from .gws_simulator_cometd import CometdServer, _BayeuxSession
from .simulate import Simulator

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # loopback only: this is a simulator with a well-known password
# GWS statusCode for an HTTP error status ("Return Values" page).
GWS_STATUS_CODES = {400: 2, 401: NOT_AUTHENTICATED, 403: 3, 404: 6, 405: 3, 500: 4}
_AGENT = web.RequestKey("agent", SimulatedAgent)


class GwsSimulator:
    """The server, in process: ``async with GwsSimulator(agents=3) as gws: ... gws.url``.

    ``rate``: notifications per second over all agents (0: as fast as possible); ``events``:
    how many in all (None: without end); ``timeout``/``max_interval`` in milliseconds, as
    Bayeux advice: how long a connect is held, how long a session lives without one;
    ``ack``: the ack extension, "on", "object" or "off"; ``java_402``: word 402 as Java CometD
    ("402::Unknown client") instead of the Node server ("402::session_unknown");
    ``ssl_context``: serve https; ``wait_for_sessions``: publish only once every agent has a
    subscribed session; ``simulator``: the stream to publish (default: a seeded Simulator with
    ``duplicate_rate`` 0).

    Attributes for callers: ``url`` (``http(s)://127.0.0.1:<port>``), ``notifications_url``;
    per agent: ``published`` (messages handed to the agent), ``lost`` (published while the
    agent had no subscribed session), ``delivered`` (messages written into a reply to one of
    the agent's sessions, once per session; re-sends not included), ``discarded`` (messages
    that died with a session: queued and never sent, or sent and never acknowledged);
    ``resent`` (messages sent again because their batch was not acknowledged); ``sessions``
    (client id -> session); ``finished`` (an asyncio.Event set once ``events`` are published);
    ``publishing`` (an asyncio.Event set when the publisher starts); ``current_workitems(agent)``.
    """

    def __init__(self, *, agents: int = 10, password: str = "demo", port: int = 0,
                 rate: float = 100.0, events: int | None = None, csrf: bool = True, seed: int = 1,
                 timeout: int = 30_000, max_interval: int = 10_000, ack: str = "on",
                 java_402: bool = False, ssl_context: ssl.SSLContext | None = None,
                 wait_for_sessions: bool = False, simulator: Simulator | None = None):
        if rate < 0:
            raise ValueError("rate must not be negative")
        self.password, self.port, self.rate, self.events, self.csrf = password, port, rate, events, csrf
        self.ssl_context, self.wait_for_sessions = ssl_context, wait_for_sessions
        # A real server sends a message once per session: no duplicates in the stream itself.
        self.simulator = simulator or Simulator(agents=agents, seed=seed, duplicate_rate=0.0)
        self.agents = {a.source: SimulatedAgent(a.source) for a in self.simulator.agents}
        self.cometd = CometdServer(list(self.agents), timeout=timeout, max_interval=max_interval, ack=ack,
                                   java_402=java_402)
        self.published = {name: 0 for name in self.agents}
        self.lost = {name: 0 for name in self.agents}
        self.finished = asyncio.Event()
        self.publishing = asyncio.Event()
        self._http_sessions: dict[str, tuple[str, str]] = {}  # JSESSIONID -> (agent, CSRF token)
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []

    # The CometD server's own counts and sessions, for callers.
    @property
    def delivered(self) -> dict[str, int]:
        return self.cometd.delivered

    @property
    def discarded(self) -> dict[str, int]:
        return self.cometd.discarded

    @property
    def resent(self) -> int:
        return self.cometd.resent

    @property
    def sessions(self) -> dict[str, _BayeuxSession]:
        return self.cometd.sessions

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context is not None else 'http'}://{HOST}:{self.port}"

    @property
    def notifications_url(self) -> str:
        return self.url + NOTIFICATIONS_PATH

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen on 127.0.0.1 (``port`` 0: any free port, then in ``port``) and start publishing
        (with ``wait_for_sessions``: once every agent has a subscribed session)."""
        app = web.Application(middlewares=[self._gws_middleware])
        app.router.add_get(ME_PATH, self._me)
        app.router.add_get(ME_WORKITEMS_PATH, self._workitems)
        app.router.add_post(NOTIFICATIONS_PATH, self._bayeux)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=self.ssl_context).start()
        self._tasks = [asyncio.create_task(self._publish(), name="gws-simulator publisher"),
                       asyncio.create_task(self.cometd.expire_idle(), name="gws-simulator expiry")]
        log.info("GWS simulator at %s: %d agents, CSRF %s, ack %s", self.url, len(self.agents),
                 "on" if self.csrf else "off", self.cometd.ack)

    async def stop(self) -> None:
        """Answer held connects, stop publishing and close the server."""
        self.cometd.closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.cometd.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def expire(self, client_id: str) -> None:
        """Forget a Bayeux session, as a server does when it expires: its next request gets a
        402 (a held connect at once).  Its queued and unacknowledged messages die with it."""
        self.cometd.expire(client_id)

    def current_workitems(self, agent: str) -> list[dict]:
        """The agent's current workitem resources (what ``GET /api/v2/me/workitems?fields=*``
        answers in ``workitems``), in the order they arrived; copies."""
        return self.agents[agent].current_workitems()

    # -- publishing ----------------------------------------------------------------------------

    async def _publish(self) -> None:
        if self.wait_for_sessions:
            await self.cometd.all_listening()
        self.publishing.set()
        loop = asyncio.get_running_loop()
        started, n = loop.time(), 0
        for source, message in self.simulator.messages(self.events):
            received = self.simulator.clock  # the simulated time of this message
            if self.rate:
                due = started + n / self.rate
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
            elif n % 1000 == 0:
                await asyncio.sleep(0)
            self._hand(self.agents[source], message, received)
            n += 1
        self.finished.set()
        log.info("GWS simulator: published %d notifications (%d lost: no session listening)",
                 n, sum(self.lost.values()))

    def _hand(self, agent: SimulatedAgent, message: dict, received: dt.datetime) -> None:
        """One published message for the agent: its workitems follow, each subscribed session
        queues it, or it is lost when there is none."""
        message = {key: value for key, value in message.items() if key != "id"}  # servers set no id
        self.published[agent.name] += 1
        agent.follow(message, received)
        if not self.cometd.publish(agent.name, message):
            self.lost[agent.name] += 1

    # -- HTTP: auth, JSESSIONID, CSRF, GWS error bodies ------------------------------------------

    @staticmethod
    def _error(status: int, message: str, code: int | None = None, headers: dict | None = None) -> web.Response:
        """A GWS error: ``{"statusCode": ..., "statusMessage": ...}`` as application/json."""
        code = GWS_STATUS_CODES.get(status, 4) if code is None else code
        return web.json_response({"statusCode": code, "statusMessage": message}, status=status, headers=headers)

    @web.middleware
    async def _gws_middleware(self, request: web.Request, handler):
        agent = self._authenticate(request)
        if agent is None:
            return self._error(401, ACCESS_DENIED, NOT_AUTHENTICATED,
                               headers={"WWW-Authenticate": 'Basic realm="GWS simulator"'})
        jsession = request.cookies.get("JSESSIONID")
        found = self._http_sessions.get(jsession or "")
        new_session = found is None or found[0] != agent.name
        if found is None or new_session:
            if len(self._http_sessions) >= 10_000:  # clients that keep no cookies: forget the oldest
                del self._http_sessions[next(iter(self._http_sessions))]
            jsession = secrets.token_hex(16).upper()
            found = (agent.name, secrets.token_urlsafe(24))
            self._http_sessions[jsession] = found
        known = found
        if self.csrf and request.method not in ("GET", "HEAD", "OPTIONS"):
            sent = request.headers.get(CSRF_TOKEN_HEADER, "")
            if new_session or not hmac.compare_digest(sent.encode(), known[1].encode()):
                response = self._error(403, CSRF_ERROR, NOT_AUTHENTICATED)
                self._set_http_session(response, jsession, new_session, known)
                return response
        request[_AGENT] = agent
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = self._error(exc.status, exc.reason, headers=headers)
        self._set_http_session(response, jsession, new_session, known, csrf=request.method == "GET")
        return response

    def _set_http_session(self, response, jsession, new_session, known, csrf=False) -> None:
        if new_session:
            response.set_cookie("JSESSIONID", jsession, path="/", httponly=True)
        if self.csrf and csrf:
            response.headers[CSRF_HEADER_NAME_HEADER] = CSRF_TOKEN_HEADER
            response.headers[CSRF_TOKEN_HEADER] = known[1]

    def _authenticate(self, request: web.Request) -> SimulatedAgent | None:
        kind, _, value = request.headers.get("Authorization", "").partition(" ")
        if kind.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        agent = self.agents.get(user)
        if agent is None or not hmac.compare_digest(password.encode(), self.password.encode()):
            return None
        return agent

    async def _me(self, request: web.Request) -> web.Response:
        return web.json_response(request[_AGENT].user_json(self.url))

    async def _workitems(self, request: web.Request) -> web.Response:
        """GWS "Recovering Existing State": the agent's current workitems."""
        return web.json_response(request[_AGENT].workitems_json(request.query.get("fields")))

    async def _bayeux(self, request: web.Request) -> web.Response:
        return await self.cometd.handle(request, request[_AGENT].name)
