"""A GWS-like server on loopback for demos, tests and benchmarks: ``workitem-store simulate-server``.

It plays the parts of Genesys Web Services that an ingesting client meets:

- HTTP Basic auth for simulated agents ``agent-001`` .. (one password for all); 401 otherwise.
- ``GET /api/v2/me``: the agent's user JSON.  With CSRF on, every GET answers the headers
  ``X-CSRF-HEADER: X-CSRF-TOKEN`` and ``X-CSRF-TOKEN: <token>``, the token belonging to the HTTP
  session of the ``JSESSIONID`` cookie (made at the first request); a POST without that token
  gets 403 "Missing or invalid Csrf token".
- CometD (Bayeux 1.0, long-polling only) at ``POST /api/v2/notifications``: handshake (alone in
  its request, sets the ``BAYEUX_BROWSER`` cookie, ack extension on request), subscribe to
  ``/v2/me/workitems`` (the authenticated agent's own topic; nothing else), connect (held up to
  ``advice.timeout`` ms or until messages are queued; with ack, each reply numbers its batch in
  ``ext.ack`` and what the next connect does not acknowledge is sent again), unsubscribe,
  disconnect.  An unknown or foreign clientId gets ``402::session_unknown`` with
  ``reconnect: handshake`` advice.

One publisher task walks the seeded ``store.simulate.Simulator`` stream (the same as
``workitem-store simulate``), paced to ``rate`` notifications per second overall, and hands each
Bayeux message to its agent.  An agent's messages wait in its backlog while no session of that
agent is subscribed, and a session that ends (disconnect, expiry) gives back what was queued or
not yet acknowledged: nothing published is lost, duplicates are possible (at least once).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import json
import logging
import secrets
import socket
import time
from collections import deque
from typing import Any, Self

from aiohttp import web

from ..simulate import CHANNEL, Simulator

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # loopback only: this is a simulator with a well-known password
NOTIFICATIONS_PATH = "/api/v2/notifications"
CSRF_HEADER = "X-CSRF-TOKEN"
CSRF_ERROR = "Missing or invalid Csrf token"
SESSION_UNKNOWN = "402::session_unknown"
_AGENT = web.RequestKey("agent", object)


@dataclasses.dataclass
class _Agent:
    name: str
    user_id: str
    backlog: deque = dataclasses.field(default_factory=deque)  # published while nobody listened (bounded)
    sessions: dict[str, _BayeuxSession] = dataclasses.field(default_factory=dict)  # subscribed ones

    def user_json(self, base: str) -> dict:
        number = self.name.rsplit("-", 1)[-1]
        return {"statusCode": 0, "user": {
            "id": self.user_id, "userName": self.name, "firstName": "Agent", "lastName": number,
            "roles": ["ROLE_AGENT"], "enabledChannels": ["workitem"], "changedBy": "simulator",
            "uri": f"{base}/api/v2/users/{self.user_id}", "path": f"/users/{self.user_id}"}}


@dataclasses.dataclass
class _BayeuxSession:
    client_id: str
    agent: _Agent
    browser: str
    ack: bool
    subscribed: bool = False
    queue: deque = dataclasses.field(default_factory=deque)      # not yet sent
    unacked: deque = dataclasses.field(default_factory=deque)    # (batch, message) sent, not acknowledged
    batch: int = 0
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    polls: int = 0            # connects seen: a newer one answers a held older one at once
    holding: int = 0          # connects being held (an older one is answering)
    last_seen: float = dataclasses.field(default_factory=time.monotonic)
    removed: bool = False


class GwsSimulator:
    """The server, in process: ``async with GwsSimulator(agents=3) as gws: ... gws.url``.

    ``rate``: notifications per second over all agents (0: as fast as possible); ``events``:
    how many in all (None: without end); ``timeout``/``max_interval`` in milliseconds, as
    Bayeux advice: how long a connect is held, how long a session lives without one;
    ``max_backlog``: how many messages an agent without a session keeps (the oldest go first).

    Attributes for callers: ``url`` (``http://127.0.0.1:<port>``), ``notifications_url``,
    ``published`` (messages published per agent), ``resent`` (messages sent again because a
    batch was not acknowledged), ``sessions`` (client id -> session), ``finished`` (an
    asyncio.Event set once ``events`` are published).
    """

    def __init__(self, *, agents: int = 10, password: str = "demo", port: int = 0,
                 rate: float = 100.0, events: int | None = None, csrf: bool = True, seed: int = 1,
                 timeout: int = 30_000, max_interval: int = 10_000, max_backlog: int = 100_000,
                 simulator: Simulator | None = None):
        if rate < 0:
            raise ValueError("rate must not be negative")
        self.password, self.port, self.rate, self.events, self.csrf = password, port, rate, events, csrf
        self.timeout, self.max_interval = timeout, max_interval
        self.simulator = simulator or Simulator(agents=agents, seed=seed)
        self.agents = {a.source: _Agent(a.source, secrets.token_hex(16), deque(maxlen=max_backlog))
                       for a in self.simulator.agents}
        self.published = {name: 0 for name in self.agents}
        self.resent = 0
        self.sessions: dict[str, _BayeuxSession] = {}
        self.finished = asyncio.Event()
        self._http_sessions: dict[str, tuple[str, str]] = {}  # JSESSIONID -> (agent, CSRF token)
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def notifications_url(self) -> str:
        return self.url + NOTIFICATIONS_PATH

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen on 127.0.0.1 (``port`` 0: any free port, then in ``port``) and start publishing."""
        app = web.Application(middlewares=[self._gws_middleware])
        app.router.add_get("/api/v2/me", self._me)
        app.router.add_post(NOTIFICATIONS_PATH, self._bayeux)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self._tasks = [asyncio.create_task(self._publish(), name="gws-simulator publisher"),
                       asyncio.create_task(self._expire_idle(), name="gws-simulator expiry")]
        log.info("GWS simulator at %s: %d agents, CSRF %s", self.url, len(self.agents),
                 "on" if self.csrf else "off")

    async def stop(self) -> None:
        """Answer held connects, stop publishing and close the server."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for session in self.sessions.values():
            session.wake.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def expire(self, client_id: str) -> None:
        """Forget a Bayeux session, as a server does when it expires: its next request gets
        402::session_unknown (a held connect at once).  Its undelivered messages go back to the
        agent's backlog."""
        session = self.sessions.get(client_id)
        if session is None:
            raise KeyError(client_id)
        self._remove(session)

    # -- publishing ----------------------------------------------------------------------------

    async def _publish(self) -> None:
        loop = asyncio.get_running_loop()
        started, n = loop.time(), 0
        for source, message in self.simulator.messages(self.events):
            if self.rate:
                due = started + n / self.rate
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
            elif n % 1000 == 0:
                await asyncio.sleep(0)
            self._deliver(self.agents[source], message)
            n += 1
        self.finished.set()
        log.info("GWS simulator: published %d notifications", n)

    def _deliver(self, agent: _Agent, message: dict) -> None:
        self.published[agent.name] += 1
        if not agent.sessions:
            agent.backlog.append(message)
        for session in agent.sessions.values():
            session.queue.append(message)
            session.wake.set()

    async def _expire_idle(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.max_interval / 4000))
            limit = time.monotonic() - self.max_interval / 1000
            for session in [s for s in self.sessions.values() if not s.holding and s.last_seen < limit]:
                log.info("GWS simulator: session %s... of %s expired", session.client_id[:8], session.agent.name)
                self._remove(session)

    def _remove(self, session: _BayeuxSession) -> None:
        session.removed = True
        self.sessions.pop(session.client_id, None)
        agent = session.agent
        if agent.sessions.pop(session.client_id, None) is not None and not agent.sessions:
            # Nothing is lost with the session: a later session of the agent gets it.
            agent.backlog.extendleft(reversed([m for _, m in session.unacked] + list(session.queue)))
        session.wake.set()

    # -- HTTP: auth, JSESSIONID, CSRF --------------------------------------------------------

    @web.middleware
    async def _gws_middleware(self, request: web.Request, handler):
        agent = self._authenticate(request)
        if agent is None:
            return web.Response(status=401, text="Unauthorized",
                                headers={"WWW-Authenticate": 'Basic realm="GWS simulator"'})
        jsession = request.cookies.get("JSESSIONID")
        known = self._http_sessions.get(jsession or "")
        new_session = known is None or known[0] != agent.name
        if new_session:
            if len(self._http_sessions) >= 10_000:  # clients that keep no cookies: forget the oldest
                del self._http_sessions[next(iter(self._http_sessions))]
            jsession = secrets.token_hex(16).upper()
            known = (agent.name, secrets.token_urlsafe(24))
            self._http_sessions[jsession] = known
        if self.csrf and request.method not in ("GET", "HEAD", "OPTIONS"):
            sent = request.headers.get(CSRF_HEADER, "")
            if new_session or not hmac.compare_digest(sent.encode(), known[1].encode()):
                response = web.Response(status=403, text=CSRF_ERROR)
                self._set_http_session(response, jsession, new_session, known)
                return response
        request[_AGENT] = agent
        response = await handler(request)
        self._set_http_session(response, jsession, new_session, known, csrf=request.method == "GET")
        return response

    def _set_http_session(self, response, jsession, new_session, known, csrf=False) -> None:
        if new_session:
            response.set_cookie("JSESSIONID", jsession, path="/", httponly=True)
        if self.csrf and csrf:
            response.headers["X-CSRF-HEADER"] = CSRF_HEADER
            response.headers[CSRF_HEADER] = known[1]

    def _authenticate(self, request: web.Request) -> _Agent | None:
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

    # -- Bayeux --------------------------------------------------------------------------------

    async def _bayeux(self, request: web.Request) -> web.Response:
        try:
            messages = json.loads(await request.text())
        except ValueError:
            return web.Response(status=400, text="the request is not JSON")
        if isinstance(messages, dict):
            messages = [messages]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return web.Response(status=400, text="expected a JSON array of Bayeux messages")
        agent: _Agent = request[_AGENT]
        browser = request.cookies.get("BAYEUX_BROWSER")
        if any(m.get("channel") == "/meta/handshake" for m in messages):
            if len(messages) > 1:  # as the CometD servers: a handshake travels alone
                return web.Response(status=400, text="a handshake must be alone in its request")
            return self._handshake(messages[0], agent, browser)
        replies: list[dict] = []
        connect = None
        for message in messages:
            channel = message.get("channel")
            if channel == "/meta/connect" and connect is None:
                connect = message  # answered last: it may be held
                continue
            replies.append(self._meta(message, agent, browser))
        if connect is not None:
            replies.extend(await self._connect(connect, agent, browser))
        return web.Response(text=json.dumps(replies), content_type="application/json")

    def _reply(self, message: dict, **fields: Any) -> dict:
        reply = {"channel": message.get("channel")}
        if "id" in message:
            reply["id"] = message["id"]
        return reply | fields

    def _unknown(self, message: dict) -> dict:
        return self._reply(message, successful=False, error=SESSION_UNKNOWN,
                           advice={"reconnect": "handshake", "interval": 0})

    def _session(self, message: dict, agent: _Agent, browser: str | None) -> _BayeuxSession | None:
        session = self.sessions.get(str(message.get("clientId")))
        # Another agent's session, or one asked for without its browser cookie, is not known here.
        if session is None or session.agent is not agent or session.browser != browser:
            return None
        session.last_seen = time.monotonic()
        return session

    def _handshake(self, message: dict, agent: _Agent, browser: str | None) -> web.Response:
        types = message.get("supportedConnectionTypes")
        if not isinstance(types, list) or "long-polling" not in types:
            reply = self._reply(message, successful=False, error="301::long-polling is the only connection type",
                                supportedConnectionTypes=["long-polling"],
                                advice={"reconnect": "none", "interval": 0})
            return web.json_response([reply])
        ext = message.get("ext")
        ack = isinstance(ext, dict) and ext.get("ack") is True
        new_browser = browser is None
        browser = browser or secrets.token_hex(12)
        session = _BayeuxSession(secrets.token_hex(20), agent, browser, ack)
        self.sessions[session.client_id] = session
        reply = self._reply(message, successful=True, clientId=session.client_id, version="1.0",
                            supportedConnectionTypes=["long-polling"],
                            advice={"reconnect": "retry", "interval": 0, "timeout": self.timeout})
        if ack:
            reply["ext"] = {"ack": True}
        response = web.json_response([reply])
        if new_browser:
            response.set_cookie("BAYEUX_BROWSER", browser, path="/", httponly=True)
        return response

    def _meta(self, message: dict, agent: _Agent, browser: str | None) -> dict:
        channel = message.get("channel")
        if channel not in ("/meta/subscribe", "/meta/unsubscribe", "/meta/disconnect"):
            error = "400::unknown meta channel" if str(channel).startswith("/meta/") else "403::publish denied"
            return self._reply(message, successful=False, error=error)
        session = self._session(message, agent, browser)
        if session is None:
            return self._unknown(message)
        if channel == "/meta/disconnect":
            self._remove(session)
            return self._reply(message, successful=True, clientId=session.client_id)
        subscription = message.get("subscription")
        reply = self._reply(message, clientId=session.client_id, subscription=subscription)
        if subscription != CHANNEL:
            return reply | {"successful": False, "error": f"403:{subscription}:subscription denied"}
        if channel == "/meta/subscribe" and not session.subscribed:
            session.subscribed = True
            if not agent.sessions:
                session.queue.extend(agent.backlog)
                agent.backlog.clear()
            agent.sessions[session.client_id] = session
            session.wake.set()
        elif channel == "/meta/unsubscribe" and session.subscribed:
            session.subscribed = False
            agent.sessions.pop(session.client_id, None)
        return reply | {"successful": True}

    async def _connect(self, message: dict, agent: _Agent, browser: str | None) -> list[dict]:
        session = self._session(message, agent, browser)
        if session is None:
            return [self._unknown(message)]
        ext = message.get("ext")
        if session.ack and isinstance(ext, dict) and isinstance(ext.get("ack"), int):
            acked = ext["ack"]
            while session.unacked and session.unacked[0][0] <= acked:
                session.unacked.popleft()
        advice = message.get("advice")
        hold = self.timeout
        if isinstance(advice, dict) and isinstance(advice.get("timeout"), int):
            hold = max(0, min(hold, advice["timeout"]))
        session.polls += 1
        poll = session.polls
        if session.holding:
            session.wake.set()  # one connect per client: the older one is answered now
            await asyncio.sleep(0)
        if hold and not session.queue and not session.unacked and not self._closing:
            session.holding += 1
            session.wake.clear()
            try:
                async with asyncio.timeout(hold / 1000):
                    while not (session.queue or session.removed or self._closing or session.polls != poll):
                        await session.wake.wait()
                        session.wake.clear()
            except TimeoutError:
                pass
            finally:
                session.holding -= 1
                session.last_seen = time.monotonic()
        if session.removed:
            return [self._unknown(message)]
        reply = self._reply(message, successful=True, clientId=session.client_id)
        if session.polls != poll:
            return [reply]  # superseded: the newer connect takes the messages
        resend = [m for _, m in session.unacked]
        new = list(session.queue)
        session.queue.clear()
        if session.ack:
            self.resent += len(resend)
            session.batch += 1
            session.unacked.extend((session.batch, m) for m in new)
            reply["ext"] = {"ack": session.batch}
            return resend + new + [reply]
        return new + [reply]
