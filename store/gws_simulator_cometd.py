"""The CometD server of the GWS simulator (store/gws_simulator.py): Bayeux sessions, their queues,
the ack extension and the server's errors, as Java CometD 3.1.x behind GWS behaves.  The GWS HTTP
layer in front of it (auth, JSESSIONID, CSRF, error bodies) is the simulator's; so is publishing.
Java CometD paths are those of the CometD repository at tag 3.1.9 (what GWS runs) unless they say
HEAD; "Node" is the CometD project's ``cometd-nodejs-server`` 1.2.1 (tests/cometd/node_modules).

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
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from collections import deque
from typing import Any

from aiohttp import web

from .gws_protocol import CHANNEL

log = logging.getLogger(__name__)

SESSION_UNKNOWN = "402::session_unknown"       # the Node CometD server's wording
UNKNOWN_CLIENT = "402::Unknown client"         # Java CometD 3.1.9 BayeuxServerImpl.unknownSession
ACK_MODES = ("on", "object", "off")
MULTI_SESSION_INTERVAL = 2000                  # ms, Java and Node default multiSessionInterval


@dataclasses.dataclass
class _BayeuxSession:
    client_id: str
    agent: str                # the agent (user name) whose session it is
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


class CometdServer:
    """The Bayeux sessions of every agent in ``agents`` (user names), behind ``handle()``.

    ``timeout``/``max_interval`` in milliseconds, as Bayeux advice: how long a connect is held,
    how long a session lives without one; ``ack``: the ack extension, "on", "object" or "off";
    ``java_402``: word 402 as Java CometD instead of the Node server.  Per agent: ``delivered``
    (messages written into a reply to one of its sessions, once per session; re-sends not
    included), ``discarded`` (messages that died with a session); ``resent``; ``sessions``
    (client id -> session); ``listening`` (an asyncio.Event set while every agent has a
    subscribed session).
    """

    def __init__(self, agents: list[str], *, timeout: int = 30_000, max_interval: int = 10_000,
                 ack: str = "on", java_402: bool = False):
        if ack not in ACK_MODES:
            raise ValueError(f"ack must be one of {', '.join(ACK_MODES)}")
        if timeout < 0 or max_interval <= 0:
            raise ValueError("timeout must not be negative and max_interval must be positive")
        self.timeout, self.max_interval, self.ack, self.java_402 = timeout, max_interval, ack, java_402
        self.subscribed: dict[str, dict[str, _BayeuxSession]] = {name: {} for name in agents}
        self.delivered = {name: 0 for name in agents}
        self.discarded = {name: 0 for name in agents}
        self.resent = 0
        self.sessions: dict[str, _BayeuxSession] = {}
        self.listening = asyncio.Event()
        self.closing = False
        self._browsers: dict[str, dict[str, _BayeuxSession]] = {}  # BAYEUX_BROWSER -> its sessions

    def publish(self, agent: str, message: dict) -> bool:
        """Queue ``message`` for every subscribed session of ``agent``; False when it has none
        (the message is lost)."""
        sessions = self.subscribed[agent].values()
        for session in sessions:
            session.queue.append(message)
            session.wake.set()
        return bool(sessions)

    def close(self) -> None:
        """Answer every held connect now."""
        self.closing = True
        for session in self.sessions.values():
            session.wake.set()

    def expire(self, client_id: str) -> None:
        """Forget a session, as on expiry; KeyError when there is none."""
        self._remove(self.sessions[client_id])

    async def all_listening(self) -> None:
        """Return once every agent has a subscribed session."""
        while not all(self.subscribed.values()):
            self.listening.clear()
            await self.listening.wait()

    async def expire_idle(self) -> None:
        """Forever: remove the sessions that sent no connect for ``max_interval``."""
        while True:
            await asyncio.sleep(min(1.0, self.max_interval / 4000))
            # Java ServerSessionImpl.scheduleExpiration: the last reply + the transport's interval
            # (0 here; not multiSessionInterval) + maxInterval.
            limit = time.monotonic() - self.max_interval / 1000
            for session in [s for s in self.sessions.values() if not s.holding and s.last_seen < limit]:
                log.info("GWS simulator: session %s... of %s expired", session.client_id[:8], session.agent)
                self._remove(session)

    def _remove(self, session: _BayeuxSession) -> None:
        """The session ends: its queue and unacknowledged messages die with it."""
        if session.removed:
            return
        session.removed = True
        self.sessions.pop(session.client_id, None)
        self.subscribed[session.agent].pop(session.client_id, None)
        same_browser = self._browsers.get(session.browser, {})
        same_browser.pop(session.client_id, None)
        if not same_browser:
            self._browsers.pop(session.browser, None)
        self.discarded[session.agent] += len(session.queue) + len(session.unacked)
        session.queue.clear()
        session.unacked.clear()
        session.wake.set()

    async def handle(self, request: web.Request, agent: str) -> web.Response:
        """Answer a POST of Bayeux messages by ``agent`` (authenticated by the HTTP layer); an
        HTTP error is raised as aiohttp's HTTPException (the HTTP layer words its body)."""
        try:
            messages = json.loads(await request.text())
        except ValueError:
            raise web.HTTPBadRequest(reason="the request is not JSON") from None
        if isinstance(messages, dict):
            messages = [messages]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise web.HTTPBadRequest(reason="expected a JSON array of Bayeux messages")
        browser = request.cookies.get("BAYEUX_BROWSER")
        if any(m.get("channel") == "/meta/handshake" for m in messages):
            if len(messages) > 1:  # as the CometD servers: a handshake travels alone, else HTTP 500
                raise web.HTTPInternalServerError(reason="a handshake must be alone in its request")
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

    def _session(self, message: dict, agent: str, browser: str | None) -> _BayeuxSession | None:
        session = self._browsers.get(browser or "", {}).get(str(message.get("clientId")))
        # Only the sessions of the request's browser cookie are found (Java findSession), and
        # never another agent's.
        if session is None or session.agent != agent:
            return None
        session.last_seen = time.monotonic()
        return session

    def _handshake(self, message: dict, agent: str, browser: str | None) -> web.Response:
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

    def _meta(self, message: dict, agent: str, browser: str | None) -> dict:
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
            self.subscribed[agent][session.client_id] = session
            if all(self.subscribed.values()):
                self.listening.set()
        elif channel == "/meta/unsubscribe" and session.subscribed:
            session.subscribed = False
            self.subscribed[agent].pop(session.client_id, None)
        return reply | {"successful": True}

    async def _connect(self, message: dict, agent: str, browser: str | None, *,
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
        if can_suspend and not (session.queue or (acknowledged and session.unacked) or self.closing):
            others = self._browsers.get(session.browser, {}).values()
            if any(other is not session and other.holding for other in others):
                multiple_clients = True  # another session of this browser holds a connect
            elif hold:
                session.holding += 1
                try:
                    async with asyncio.timeout(hold / 1000):
                        while not (session.queue or session.removed or self.closing or session.polls != poll):
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
        self.delivered[agent] += len(new)
        if not session.ack:
            return new + [reply]
        resend = [m for _, m in session.unacked]
        self.resent += len(resend)
        session.batch += 1
        session.unacked.extend((session.batch, m) for m in new)
        reply["ext"] = {"ack": session.batch}
        return resend + new + [reply]
