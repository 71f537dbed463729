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
- ``GET /api/v2/me``: the agent's user resource, ``{"statusCode": 0, "user": {...}}``
  ("Interpreting a Response").
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
- ``GET /api/v2/me/workitems?fields=*``: ``{"statusCode": 0, "workitems": [...]}``, the agent's
  current workitem resources (``id``, ``state``, ``capabilities``, ``workitemType``, ``uri``,
  ``userData``, ``receivedDate`` like ``2026-11-02 08:00:04.801+0000``), the read of GWS's
  "Recovering Existing State" page (resource shape: "Workitem Resource"; collection shape:
  "Return Values": a collection of resources under the resource's plural name, a collection of
  URIs under ``uris`` when no ``fields`` are asked for; ``fields=a,b`` keeps those fields).
  It follows every message the publisher hands to the agent, delivered or lost: StatusChange
  and PropertiesUpdated merge the workitem's fields into the agent's resource, a state of
  Completed or Revoked removes it, Error changes nothing.  It is always what was published up
  to the moment of the GET (``current_workitems(agent)`` gives the same list in process).
- TLS when given an ``ssl_context`` (production GWS is https).

CometD (Bayeux 1.0, long-polling only) at ``POST /api/v2/notifications``:

- A handshake travels alone: a request holding a handshake and other messages gets HTTP 500
  (Java ``AbstractHttpTransport.processMessages`` throws IOException, ``AsyncJSONTransport``
  answers 500; Node answers 500).  A body that is not JSON gets HTTP 400 (Java
  ``AbstractHttpTransport.handleJSONParseException``).
- The handshake sets the ``BAYEUX_BROWSER`` cookie unless the request has one, and records the
  session under it (Java ``AbstractHttpTransport.processMetaHandshake``/``setBrowserId``).  A
  request naming a clientId that is not among the sessions of its cookie (or of another agent)
  is answered as an unknown session (Java ``findSession`` without trustClientSession).
- Subscriptions: only ``/v2/me/workitems`` (the authenticated agent's own topic).
- Queues are per session only (Java ``ServerSessionImpl``: each session has its own queue;
  Node likewise).  Each published message goes to the queue of every subscribed session of its
  agent; published while the agent has no subscribed session, it is lost (counted in ``lost``):
  a new handshake is a new, empty session.  A session's queue and its unacknowledged messages
  die with it: on /meta/disconnect (Java ``BayeuxServerImpl`` DisconnectHandler ->
  ``removeServerSession``), on expiry when no /meta/connect came for ``max_interval`` ms after
  the last reply (Java ``ServerSessionImpl.scheduleExpiration``/``sweep``, with the transport's
  interval 0; maxInterval default 10,000 ms), and on ``expire()``.
- Deliveries carry no Bayeux ``id`` and are sent once per session (Java
  ``ServerSessionImpl.deliver(sender, channel, data)`` builds a message without id and
  ``BayeuxServerImpl.doPublish`` clears it; Node sets none): the ``id`` the seeded
  ``store.simulate.Simulator`` puts on its messages is stripped, and the server's own Simulator
  has ``duplicate_rate`` 0.  The only repeats are ack-extension re-sends within a session.
- /meta/connect, alone in its request, is held up to ``advice.timeout`` (``timeout`` ms, or
  less when the client asks for less) until a message is queued; a newer connect of the same
  session answers a held one at once (Java ``processMetaConnect``: ``canSuspend`` only for a
  lone connect, ``setScheduler(null)`` cancels the previous long poll).  Messages go out in
  connect replies only (Java with the ack extension: ``setMetaConnectDeliveryOnly``; without
  it Java may also flush a session's queue with other replies, which is not copied).
- Ack extension (``ack`` mode; Java ``AcknowledgedMessagesExtension`` /
  ``AcknowledgedMessagesSessionExtension``, same code at 3.1.9 and HEAD): enabled for a session
  whose handshake has ``ext: {ack: true}`` unless the mode is "off" ("off": the request's
  ext.ack is ignored and no reply carries one, as a server without the extension).  "on": the
  handshake reply has ``ext: {ack: true}`` and the first connect reply closes batch 1; "object":
  as ``sendMeta`` with allowMessageDeliveryDuringHandshake, the handshake reply closes batch 1
  (empty: the session has no subscription yet) and says ``ext: {ack: {enabled: true, batch:
  1}}``, so connect replies go on from batch 2.  Every connect reply closes the next batch in
  ``ext.ack`` and carries every message not yet acknowledged followed by the new ones
  (``deQueue``/``exportMessagesToBatch``); a connect's ``ext.ack = N`` drops batches <= N
  (``processBatch``/``clearToBatch``), and when it leaves unacknowledged messages the connect is
  answered at once (``updateAdvice`` forces timeout 0).  Re-sends happen only within their own
  session.
- multiple-clients: while one session of a ``BAYEUX_BROWSER`` cookie holds a connect, a
  connect of another session with the same cookie that would be held is answered at once,
  successful, with advice ``{"multiple-clients": true, "reconnect": "retry", "interval": 2000}``
  (Java ``AbstractHttpTransport.processMetaConnect``/``incBrowserId``: maxSessionsPerBrowser 1,
  multiSessionInterval 2000; HEAD and 3.1.9 alike; Node the same).
- An unknown session gets ``402::session_unknown`` (Node ``_unknown``) or, with ``java_402``,
  ``402::Unknown client`` (Java ``BayeuxServerImpl.unknownSession``); either way with advice
  ``{reconnect: handshake, interval: 0}`` on handshake and connect replies only.

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
import copy
import dataclasses
import datetime as dt
import hmac
import json
import logging
import secrets
import socket
import ssl
import time
from collections import deque
from typing import Any, Self

from aiohttp import web

from .simulate import CHANNEL, Simulator

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # loopback only: this is a simulator with a well-known password
NOTIFICATIONS_PATH = "/api/v2/notifications"
WORKITEMS_PATH = "/api/v2/me/workitems"
CSRF_HEADER = "X-CSRF-TOKEN"
CSRF_ERROR = "Missing or invalid Csrf token"   # the statusMessage of GWS's CSRF 403
ACCESS_DENIED = "Access denied"                # the statusMessage of GWS's 401
NOT_AUTHENTICATED = 20                         # GWS statusCode: user not authenticated
SESSION_UNKNOWN = "402::session_unknown"       # the Node CometD server's wording
UNKNOWN_CLIENT = "402::Unknown client"         # Java CometD 3.1.9 BayeuxServerImpl.unknownSession
ACK_MODES = ("on", "object", "off")
MULTI_SESSION_INTERVAL = 2000                  # ms, Java and Node default multiSessionInterval
FINAL_STATES = ("Completed", "Revoked")        # a workitem in these leaves the agent's list
# GWS statusCode for an HTTP error status ("Return Values" page).
GWS_STATUS_CODES = {400: 2, 401: NOT_AUTHENTICATED, 403: 3, 404: 6, 405: 3, 500: 4}
_AGENT = web.RequestKey("agent", object)


@dataclasses.dataclass
class _Agent:
    name: str
    user_id: str
    sessions: dict[str, _BayeuxSession] = dataclasses.field(default_factory=dict)  # subscribed ones
    workitems: dict[str, dict] = dataclasses.field(default_factory=dict)  # id -> current resource

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
    batch: int = 0            # the last batch number closed (ack extension)
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
        if ack not in ACK_MODES:
            raise ValueError(f"ack must be one of {', '.join(ACK_MODES)}")
        if timeout < 0 or max_interval <= 0:
            raise ValueError("timeout must not be negative and max_interval must be positive")
        self.password, self.port, self.rate, self.events, self.csrf = password, port, rate, events, csrf
        self.timeout, self.max_interval, self.ack, self.java_402 = timeout, max_interval, ack, java_402
        self.ssl_context, self.wait_for_sessions = ssl_context, wait_for_sessions
        # A real server sends a message once per session: no duplicates in the stream itself.
        self.simulator = simulator or Simulator(agents=agents, seed=seed, duplicate_rate=0.0)
        self.agents = {a.source: _Agent(a.source, secrets.token_hex(16)) for a in self.simulator.agents}
        self.published = {name: 0 for name in self.agents}
        self.lost = {name: 0 for name in self.agents}
        self.delivered = {name: 0 for name in self.agents}
        self.discarded = {name: 0 for name in self.agents}
        self.resent = 0
        self.sessions: dict[str, _BayeuxSession] = {}
        self.finished = asyncio.Event()
        self.publishing = asyncio.Event()
        self._listening = asyncio.Event()  # set when every agent has a subscribed session
        self._browsers: dict[str, dict[str, _BayeuxSession]] = {}  # BAYEUX_BROWSER -> its sessions
        self._http_sessions: dict[str, tuple[str, str]] = {}  # JSESSIONID -> (agent, CSRF token)
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._closing = False

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
        app.router.add_get("/api/v2/me", self._me)
        app.router.add_get(WORKITEMS_PATH, self._workitems)
        app.router.add_post(NOTIFICATIONS_PATH, self._bayeux)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=self.ssl_context).start()
        self._tasks = [asyncio.create_task(self._publish(), name="gws-simulator publisher"),
                       asyncio.create_task(self._expire_idle(), name="gws-simulator expiry")]
        log.info("GWS simulator at %s: %d agents, CSRF %s, ack %s", self.url, len(self.agents),
                 "on" if self.csrf else "off", self.ack)

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
        """Forget a Bayeux session, as a server does when it expires: its next request gets a
        402 (a held connect at once).  Its queued and unacknowledged messages die with it."""
        session = self.sessions.get(client_id)
        if session is None:
            raise KeyError(client_id)
        self._remove(session)

    def current_workitems(self, agent: str) -> list[dict]:
        """The agent's current workitem resources (what ``GET /api/v2/me/workitems?fields=*``
        answers in ``workitems``), in the order they arrived; copies."""
        return [copy.deepcopy(resource) for resource in self.agents[agent].workitems.values()]

    # -- publishing ----------------------------------------------------------------------------

    async def _publish(self) -> None:
        if self.wait_for_sessions:
            await self._all_listening()
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

    async def _all_listening(self) -> None:
        while not all(agent.sessions for agent in self.agents.values()):
            self._listening.clear()
            await self._listening.wait()

    def _hand(self, agent: _Agent, message: dict, received: dt.datetime) -> None:
        """One published message for the agent: its workitems follow, each subscribed session
        queues it, or it is lost when there is none."""
        message = {key: value for key, value in message.items() if key != "id"}  # servers set no id
        self.published[agent.name] += 1
        self._follow(agent, message, received)
        if not agent.sessions:
            self.lost[agent.name] += 1
            return
        for session in agent.sessions.values():
            session.queue.append(message)
            session.wake.set()

    @staticmethod
    def _follow(agent: _Agent, message: dict, received: dt.datetime) -> None:
        data = message.get("data")
        if not isinstance(data, dict) or data.get("notificationType") not in ("StatusChange", "PropertiesUpdated"):
            return  # Error notifications change no workitem
        workitem = data.get("workitem")
        if not isinstance(workitem, dict) or not isinstance(workitem.get("id"), str):
            return
        wid = workitem["id"]
        resource = agent.workitems.get(wid) or {"receivedDate": _gws_date(received)}
        resource = {**resource, **copy.deepcopy(workitem)}
        if resource.get("state") in FINAL_STATES:
            agent.workitems.pop(wid, None)
        else:
            agent.workitems[wid] = _resource_order(resource)

    async def _expire_idle(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.max_interval / 4000))
            # Java ServerSessionImpl.scheduleExpiration: the last reply + the transport's interval
            # (0 here; not multiSessionInterval) + maxInterval.
            limit = time.monotonic() - self.max_interval / 1000
            for session in [s for s in self.sessions.values() if not s.holding and s.last_seen < limit]:
                log.info("GWS simulator: session %s... of %s expired", session.client_id[:8], session.agent.name)
                self._remove(session)

    def _remove(self, session: _BayeuxSession) -> None:
        """The session ends: its queue and unacknowledged messages die with it."""
        if session.removed:
            return
        session.removed = True
        self.sessions.pop(session.client_id, None)
        session.agent.sessions.pop(session.client_id, None)
        same_browser = self._browsers.get(session.browser, {})
        same_browser.pop(session.client_id, None)
        if not same_browser:
            self._browsers.pop(session.browser, None)
        self.discarded[session.agent.name] += len(session.queue) + len(session.unacked)
        session.queue.clear()
        session.unacked.clear()
        session.wake.set()

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

    async def _workitems(self, request: web.Request) -> web.Response:
        """GWS "Recovering Existing State": the agent's current workitems."""
        resources = self.current_workitems(request[_AGENT].name)
        fields = request.query.get("fields")
        if fields is None:  # GWS "Return Values": a collection without fields is one of URIs
            return web.json_response({"statusCode": 0, "uris": [r.get("uri") for r in resources]})
        if fields.strip() != "*":
            wanted = {f.strip() for f in fields.split(",")} | {"id"}
            resources = [{k: v for k, v in r.items() if k in wanted} for r in resources]
        return web.json_response({"statusCode": 0, "workitems": resources})

    # -- Bayeux --------------------------------------------------------------------------------

    async def _bayeux(self, request: web.Request) -> web.Response:
        try:
            messages = json.loads(await request.text())
        except ValueError:
            return self._error(400, "the request is not JSON")
        if isinstance(messages, dict):
            messages = [messages]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return self._error(400, "expected a JSON array of Bayeux messages")
        agent: _Agent = request[_AGENT]
        browser = request.cookies.get("BAYEUX_BROWSER")
        if any(m.get("channel") == "/meta/handshake" for m in messages):
            if len(messages) > 1:  # as the CometD servers: a handshake travels alone, else HTTP 500
                return self._error(500, "a handshake must be alone in its request")
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
            replies.extend(await self._connect(connect, agent, browser, can_suspend=len(messages) == 1))
        return web.Response(text=json.dumps(replies), content_type="application/json")

    def _reply(self, message: dict, **fields: Any) -> dict:
        reply = {"channel": message.get("channel")}
        if "id" in message:
            reply["id"] = message["id"]
        return reply | fields

    def _unknown(self, message: dict) -> dict:
        reply = self._reply(message, successful=False, error=UNKNOWN_CLIENT if self.java_402 else SESSION_UNKNOWN)
        if message.get("channel") in ("/meta/handshake", "/meta/connect"):
            reply["advice"] = {"reconnect": "handshake", "interval": 0}
        return reply

    def _session(self, message: dict, agent: _Agent, browser: str | None) -> _BayeuxSession | None:
        session = self._browsers.get(browser or "", {}).get(str(message.get("clientId")))
        # Only the sessions of the request's browser cookie are found (Java findSession), and
        # never another agent's.
        if session is None or session.agent is not agent:
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
        ack = self.ack != "off" and isinstance(ext, dict) and ext.get("ack") is True
        new_browser = browser is None
        browser = browser or secrets.token_hex(12)
        session = _BayeuxSession(secrets.token_hex(20), agent, browser, ack)
        self.sessions[session.client_id] = session
        self._browsers.setdefault(browser, {})[session.client_id] = session
        reply = self._reply(message, successful=True, clientId=session.client_id, version="1.0",
                            supportedConnectionTypes=["long-polling"],
                            advice={"reconnect": "retry", "interval": 0, "timeout": self.timeout})
        if ack and self.ack == "object":
            session.batch = 1  # the handshake reply closes batch 1, empty: nothing is subscribed yet
            reply["ext"] = {"ack": {"enabled": True, "batch": session.batch}}
        elif ack:
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
            agent.sessions[session.client_id] = session
            if all(a.sessions for a in self.agents.values()):
                self._listening.set()
        elif channel == "/meta/unsubscribe" and session.subscribed:
            session.subscribed = False
            agent.sessions.pop(session.client_id, None)
        return reply | {"successful": True}

    async def _connect(self, message: dict, agent: _Agent, browser: str | None, *,
                       can_suspend: bool = True) -> list[dict]:
        session = self._session(message, agent, browser)
        if session is None:
            return [self._unknown(message)]
        ext = message.get("ext")
        acknowledged = False
        if session.ack and isinstance(ext, dict):
            number = ext.get("ack")
            if isinstance(number, int) and not isinstance(number, bool):
                acknowledged = True
                while session.unacked and session.unacked[0][0] <= number:
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
        multiple_clients = False
        # Answered at once: new messages, or an ack that left messages unacknowledged.
        if can_suspend and not (session.queue or (acknowledged and session.unacked) or self._closing):
            others = self._browsers.get(session.browser, {}).values()
            if any(other is not session and other.holding for other in others):
                multiple_clients = True  # another session of this browser holds a connect
            elif hold:
                session.holding += 1
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
        if multiple_clients:
            reply["advice"] = {"multiple-clients": True, "reconnect": "retry", "interval": MULTI_SESSION_INTERVAL}
        if session.polls != poll:
            return [reply]  # superseded: the newer connect takes the messages
        new = list(session.queue)
        session.queue.clear()
        self.delivered[agent.name] += len(new)
        if not session.ack:
            return new + [reply]
        resend = [m for _, m in session.unacked]
        self.resent += len(resend)
        session.batch += 1
        session.unacked.extend((session.batch, m) for m in new)
        reply["ext"] = {"ack": session.batch}
        return resend + new + [reply]


def _gws_date(when: dt.datetime) -> str:
    """GWS's date format: ``2026-11-02 08:00:04.801+0000``."""
    return f"{when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:03d}{when:%z}"


_RESOURCE_KEYS = ("id", "state", "capabilities", "workitemType", "uri", "userData", "receivedDate")


def _resource_order(resource: dict) -> dict:
    ordered = {key: resource[key] for key in _RESOURCE_KEYS if key in resource}
    return ordered | {key: value for key, value in resource.items() if key not in ordered}
