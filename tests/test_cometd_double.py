"""The CometD test double (tests/cometd/server.js) behaves as the real servers do.

What each behaviour copies, and from which source, is in the header of tests/cometd/server.js:
the Java CometD 3.1.x server behind GWS, npm cometd-nodejs-server (the double's engine) and
the GWS API documentation.  Most tests speak Bayeux by hand (``Browser``) so that what is pinned
is the server, not the client; a few run store/ingest/bayeux.py's BayeuxClient against it.
Tests synchronise by polling with deadlines, never by sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import uuid

import aiohttp
import pytest
from cometd_server import CHANNEL, Control, NodeServer, Recorder, eventually, notification

from store.ingest.bayeux import BayeuxClient
from store.ingest.bayeux_transport import basic_authorization

ACCESS_DENIED = {"statusCode": 20, "statusMessage": "Access denied"}
CSRF_REFUSED = {"statusCode": 20, "statusMessage": "Missing or invalid Csrf token"}
UNKNOWN_ADVICE = {"reconnect": "handshake", "interval": 0}
GWS_DATE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\+0000$")


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def login(tag: str = "agent") -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"  # the server is shared: logins of this test only


def jar_session(**kwargs) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), **kwargs)


def events(messages: list[dict]) -> list[dict]:
    return [m for m in messages if not m["channel"].startswith("/meta/")]


def reply_to(messages: list[dict], channel: str) -> dict:
    return next(m for m in messages if m["channel"] == channel)


class Browser:
    """Bayeux by hand, as one browser: its own cookie jar (BAYEUX_BROWSER), optional Basic auth."""

    def __init__(self, server: NodeServer, auth: tuple[str, str] | None = None, http=None):
        self.server, self.authorization = server, basic_authorization(auth)
        self.http, self.owns = http, http is None
        self.client_id: str | None = None
        self.batch: int | None = None  # the last ext.ack number a connect reply carried
        self._id = 0

    async def __aenter__(self) -> Browser:
        if self.http is None:
            self.http = jar_session()
        return self

    async def __aexit__(self, *exc) -> None:
        if self.owns:
            await self.http.close()

    def message(self, channel: str, **fields) -> dict:
        self._id += 1
        return {"channel": channel, "id": str(self._id), **fields}

    async def post(self, *messages: dict, headers: dict | None = None) -> tuple[int, object]:
        sent = {"Content-Type": "application/json"}
        if self.authorization:
            sent["Authorization"] = self.authorization
        sent.update(headers or {})
        async with self.http.post(self.server.url, data=json.dumps(list(messages)), headers=sent) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None

    async def exchange(self, *messages: dict) -> list[dict]:
        status, body = await self.post(*messages)
        assert status == 200, (status, body)
        return body

    async def handshake(self, ext: dict | None = None) -> dict:
        fields = {"version": "1.0", "minimumVersion": "1.0", "supportedConnectionTypes": ["long-polling"]}
        if ext is not None:
            fields["ext"] = ext
        reply = reply_to(await self.exchange(self.message("/meta/handshake", **fields)), "/meta/handshake")
        assert reply["successful"], reply
        self.client_id = reply["clientId"]
        return reply

    async def subscribe(self, client_id: str | None = None) -> dict:
        return reply_to(await self.exchange(self.message("/meta/subscribe", clientId=client_id or self.client_id,
                                                        subscription=CHANNEL)), "/meta/subscribe")

    async def connect(self, ack: int | None = None, timeout: int | None = 0,
                      client_id: str | None = None) -> tuple[dict, list[dict]]:
        """One /meta/connect; -> (its reply, the deliveries).  ``timeout``: the advice asked for
        (0: answer at once, as clients do after a handshake; None: the server's own timeout)."""
        fields = {"clientId": client_id or self.client_id, "connectionType": "long-polling"}
        if timeout is not None:
            fields["advice"] = {"timeout": timeout}
        if ack is not None:
            fields["ext"] = {"ack": ack}
        messages = await self.exchange(self.message("/meta/connect", **fields))
        reply = reply_to(messages, "/meta/connect")
        batch = (reply.get("ext") or {}).get("ack")
        if isinstance(batch, int):
            self.batch = batch
        return reply, events(messages)

    async def disconnect(self) -> None:
        await self.exchange(self.message("/meta/disconnect", clientId=self.client_id))


def data_of(deliveries: list[dict]) -> list[dict]:
    return [m["data"] for m in deliveries]


def workitem(ref: int, wid: str, ntype: str = "StatusChange", **fields) -> dict:
    return {"messageType": "WorkitemStateChangeMessage", "notificationType": ntype, "referenceId": ref,
            "workitem": {"id": wid, **fields}}


async def get_json(http: aiohttp.ClientSession, url: str, auth=None, headers=None):
    sent = dict(headers or {})
    if auth is not None:
        sent["Authorization"] = auth if isinstance(auth, str) else basic_authorization(auth)
    async with http.get(url, headers=sent) as response:
        return response.status, response.headers, await response.json(content_type=None)


# -- deliveries and queues -------------------------------------------------------------------------

def test_deliveries_carry_no_id_nor_client_id(cometd):
    user = login()

    async def main():
        async with jar_session() as http, Browser(cometd, (user, "pw"), http) as browser:
            control = Control(cometd, http)
            await browser.handshake({"ack": True})
            await browser.subscribe()
            await browser.connect(ack=-1)
            seen = []
            published = await control.publish([notification(0), notification(1)], user=user)
            assert published == {"published": 2, "sessions": [browser.client_id]}
            seen += (await browser.connect(ack=browser.batch))[1]
            await control.publish([notification(2)], to=browser.client_id)
            seen += (await browser.connect(ack=browser.batch))[1]
            await control.publish([notification(3)])  # broadcast on the channel
            seen += (await browser.connect(ack=browser.batch))[1]
            await browser.connect(ack=browser.batch)
            users = await control.users()
            await browser.disconnect()
            return browser.client_id, seen, users

    cid, seen, users = run(main())
    assert [m["data"]["referenceId"] for m in seen] == [0, 1, 2, 3]
    assert all(set(m) == {"channel", "data"} and m["channel"] == CHANNEL for m in seen)
    assert users[user]["published"] == 2 and users[user]["lost"] == 0
    assert users[user]["acked"][cid] == [notification(i) for i in range(4)]


def test_published_to_a_user_without_session_is_lost(cometd):
    user, other = login(), login()

    async def main():
        recorder = Recorder()
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            nobody = await control.publish([notification(0), notification(1)], user=user)
            before = (await control.users())[user]
            async with BayeuxClient(cometd.url, [CHANNEL], recorder, auth=(user, "pw"),
                                    backoff_base=0.02, backoff_cap=0.2) as client:
                cid = await control.wait_subscribed(client)
                somebody = await control.publish([notification(2)], user=user)
                elsewhere = await control.publish([notification(3)], user=other)  # not this session's user
                await recorder.wait_for(1)

                async def acked():
                    state = (await control.users())[user]
                    return state if state["acked"].get(cid) else None
                during = await eventually(acked, "the acknowledgement")
            return nobody, before, somebody, elsewhere, during, cid, recorder

    nobody, before, somebody, elsewhere, during, cid, recorder = run(main())
    assert nobody == {"published": 2, "sessions": []}
    assert before == {"sessions": [], "subscribed": [], "published": 2, "lost": 2, "acked": {}}
    assert somebody == {"published": 1, "sessions": [cid]} and elsewhere["sessions"] == []
    assert recorder.refs() == [2]  # the later session never gets what was published before it
    assert during == {"sessions": [cid], "subscribed": [cid], "published": 3, "lost": 2,
                      "acked": {cid: [notification(2)]}}


def test_unacknowledged_messages_die_with_their_session(cometd):
    user = login()

    async def main():
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            async with Browser(cometd, (user, "pw")) as first:
                await first.handshake({"ack": True})
                await first.subscribe()
                _, nothing = await first.connect(ack=-1)
                acked_before = first.batch
                await control.publish([notification(0), notification(1)], user=user)
                _, sent = await first.connect(ack=acked_before)
                _, again = await first.connect(ack=acked_before)  # not acknowledged: sent again
                await control.call("expire", {"clientId": first.client_id})
                gone, after_expiry = await first.connect(ack=first.batch)
            async with Browser(cometd, (user, "pw")) as second:
                await second.handshake({"ack": True})
                await second.subscribe()
                _, fresh = await second.connect(ack=-1)
                await control.publish([notification(2)], user=user)
                _, later = await second.connect(ack=second.batch)
                await second.connect(ack=second.batch)
                users = (await control.users())[user]
                await second.disconnect()
            return first.client_id, second.client_id, nothing, sent, again, gone, after_expiry, fresh, later, users

    first, second, nothing, sent, again, gone, after_expiry, fresh, later, users = run(main())
    assert nothing == [] and data_of(sent) == data_of(again) == [notification(0), notification(1)]
    assert gone["error"] == "402::session_unknown" and after_expiry == []
    assert fresh == [] and data_of(later) == [notification(2)]  # nothing of the first session's queue
    assert users["acked"] == {first: [], second: [notification(2)]} and users["sessions"] == [second]


def test_multiple_clients_advice_for_a_second_session_on_one_cookie(cometd):
    async def main():
        async with aiohttp.ClientSession() as http, jar_session() as shared:
            control = Control(cometd, http)
            async with Browser(cometd, http=shared) as first, Browser(cometd, http=shared) as second:
                await first.handshake({"ack": True})
                await first.subscribe()
                await first.connect(ack=-1)
                held = asyncio.create_task(first.connect(ack=first.batch, timeout=30_000))  # held

                async def holding():
                    return any(e["status"] is None and e["messages"][0].get("clientId") == first.client_id
                               and e["messages"][0]["channel"] == "/meta/connect" for e in await control.call("log"))
                await eventually(holding, "the first session's connect to be held")
                await second.handshake({"ack": True})
                await second.subscribe()
                reply, _ = await second.connect(ack=-1)
                cookies = [c.key for c in shared.cookie_jar]
                await first.disconnect()  # answers the held connect
                await held
                await second.disconnect()
            return reply, cookies, first.client_id, second.client_id

    reply, cookies, first, second = run(main())
    assert first != second and cookies == ["BAYEUX_BROWSER"]
    assert reply["successful"] and reply["advice"]["multiple-clients"] is True
    assert reply["advice"]["reconnect"] == "retry" and reply["advice"]["interval"] == 2000


def test_two_clients_sharing_cookies_still_get_their_own(cometd):
    async def main():
        recorders = [Recorder(), Recorder()]
        async with aiohttp.ClientSession() as http, jar_session() as shared:
            control = Control(cometd, http)
            clients = [BayeuxClient(cometd.url, [CHANNEL], r, session=shared, backoff_base=0.02, backoff_cap=0.2)
                       for r in recorders]
            for client in clients:  # one after the other: the second handshakes with the first's cookie
                client.start()
                await control.wait_subscribed(client)

            async def advised():
                replies = [m for c in clients for e in await control.traffic(c.client_id) for m in e["reply"] or []]
                return any("multiple-clients" in (m.get("advice") or {}) for m in replies)
            await eventually(advised, "multiple-clients advice")
            cids = [await control.wait_subscribed(c) for c in clients]
            for n, cid in enumerate(cids):
                await control.publish([notification(n, f"c{n}")], to=cid)
            await asyncio.gather(*(r.wait_for(1) for r in recorders))
            await asyncio.gather(*(c.stop() for c in clients))
        return recorders

    recorders = run(main())
    assert [r.refs() for r in recorders] == [[0], [1]]


# -- the ack extension, per login ------------------------------------------------------------------

def test_ack_object_form_in_the_handshake_reply(cometd):
    user = login()

    async def main():
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            configured = await control.configure(user, ack="object")
            async with Browser(cometd, (user, "pw")) as browser:
                handshake = await browser.handshake({"ack": True})
                await browser.subscribe()
                first, _ = await browser.connect(ack=handshake["ext"]["ack"]["batch"])
                await control.publish([notification(0)], user=user)
                second, sent = await browser.connect(ack=browser.batch)
                await browser.connect(ack=browser.batch)
                users = (await control.users())[user]
                await browser.disconnect()
            async with Browser(cometd, (user, "pw")) as plain:  # a client that asks for no acks
                no_ack = await plain.handshake()
                await plain.disconnect()
            return configured, handshake, first, second, sent, users, browser.client_id, no_ack

    configured, handshake, first, second, sent, users, cid, no_ack = run(main())
    assert configured == {"user": user, "ack": "object", "java402": False}
    ack = handshake["ext"]["ack"]
    assert ack == {"enabled": True, "batch": ack["batch"]} and isinstance(ack["batch"], int)
    # The handshake reply closed its batch: connect replies number on from there.
    assert first["ext"]["ack"] == ack["batch"] + 1 and second["ext"]["ack"] == ack["batch"] + 2
    assert data_of(sent) == [notification(0)] and users["acked"][cid] == [notification(0)]
    assert "ack" not in (no_ack.get("ext") or {})


def test_client_acknowledges_with_the_object_form(cometd):
    """store/ingest/bayeux.py must take {enabled: true, batch: N} as the ack extension being on."""
    user = login()

    async def main():
        recorder = Recorder()
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            await control.configure(user, ack="object")
            async with BayeuxClient(cometd.url, [CHANNEL], recorder, auth=(user, "pw"),
                                    backoff_base=0.02, backoff_cap=0.2) as client:
                cid = await control.wait_subscribed(client)
                await control.publish([notification(i) for i in range(3)], user=user)
                await recorder.wait_for(3)
                ack_enabled = client.ack_enabled

                async def acked():
                    return (await control.users())[user]["acked"].get(cid) or None
                if ack_enabled:
                    await eventually(acked, "the acknowledgement")
                traffic = await control.traffic(cid)
                users = (await control.users())[user]
            return recorder, ack_enabled, traffic, users, cid

    recorder, ack_enabled, traffic, users, cid = run(main())
    assert ack_enabled, "the client did not take ext.ack {enabled: true, batch: N} as acks on"
    polls = [m for e in traffic for m in e["messages"] if m["channel"] == "/meta/connect"]
    acks = [m.get("ext", {}).get("ack") for m in polls]
    assert all(isinstance(a, int) for a in acks) and acks == sorted(acks), acks
    assert recorder.refs() == [0, 1, 2]  # acknowledged: not sent again
    assert users["acked"][cid] == [notification(i) for i in range(3)]


def test_ack_off_is_a_server_without_the_extension(cometd):
    user = login()

    async def main():
        recorder = Recorder()
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            await control.configure(user, ack="off")
            async with Browser(cometd, (user, "pw")) as browser:
                handshake = await browser.handshake({"ack": True})
                await browser.subscribe()
                first, _ = await browser.connect(ack=-1)
                await control.publish([notification(0)], user=user)
                second, sent = await browser.connect(ack=-1)
                third, again = await browser.connect(ack=-1)
                await browser.disconnect()
            async with BayeuxClient(cometd.url, [CHANNEL], recorder, auth=(user, "pw"),
                                    backoff_base=0.02, backoff_cap=0.2) as client:
                cid = await control.wait_subscribed(client)
                await control.publish([notification(1), notification(2)], user=user)
                await recorder.wait_for(2)
                ack_enabled = client.ack_enabled
            traffic = await control.traffic(cid)
            return handshake, [first, second, third], sent, again, recorder, ack_enabled, traffic

    handshake, replies, sent, again, recorder, ack_enabled, traffic = run(main())
    assert "ack" not in (handshake.get("ext") or {})
    assert all("ack" not in (r.get("ext") or {}) for r in replies)
    assert data_of(sent) == [notification(0)] and again == []  # no acks, no resending either
    assert recorder.refs() == [1, 2] and not ack_enabled
    assert traffic[0]["messages"][0]["ext"] == {"ack": True}  # asked for, not granted
    assert all("ack" not in (m.get("ext") or {}) for e in traffic for m in e["messages"] + (e["reply"] or [])
               if m["channel"] == "/meta/connect")


# -- errors: 402, 401, 403 -------------------------------------------------------------------------

def test_402_wording_java_and_node(cometd):
    java, node = login("java"), login("node")

    async def main():
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            await control.configure(java, java402=True)
            replies = {}
            for user in (java, node):
                async with Browser(cometd, (user, "pw")) as browser:
                    connect, _ = await browser.connect(client_id="no-such-client")
                    subscribe = await browser.subscribe(client_id="no-such-client")
                    replies[user] = connect, subscribe
            return replies

    replies = run(main())
    for user, wording in ((java, "402::Unknown client"), (node, "402::session_unknown")):
        connect, subscribe = replies[user]
        assert not connect["successful"] and connect["error"] == wording
        assert connect["advice"] == UNKNOWN_ADVICE  # handshake and connect replies keep the advice
        assert not subscribe["successful"] and subscribe["error"] == wording
        assert "advice" not in subscribe  # other meta replies carry none


def test_401_access_denied_for_a_wrong_password(cometd):
    user, unregistered = login(), login()
    workitems_url = f"{cometd.base}/api/v2/me/workitems?fields=*"

    async def main():
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            registered = await control.auth({user: "s3cret"})
            results = {}
            for name, auth in {"wrong": (user, "nope"), "empty": (user, ""), "right": (user, "s3cret"),
                               "other": (unregistered, "anything")}.items():
                async with Browser(cometd, auth) as browser:
                    results[name] = await browser.post(browser.message(
                        "/meta/handshake", version="1.0", supportedConnectionTypes=["long-polling"]))
                    if results[name][0] == 200:
                        browser.client_id = results[name][1][0]["clientId"]
                        await browser.disconnect()
            no_colon = "Basic " + base64.b64encode(user.encode()).decode()
            results["no password"] = (await get_json(http, workitems_url, no_colon))[::2]
            results["get wrong"] = (await get_json(http, workitems_url, (user, "nope")))[::2]
            results["get right"] = (await get_json(http, workitems_url, (user, "s3cret")))[::2]
            headers = {"Authorization": basic_authorization((user, "x"))}
            async with http.post(cometd.url, data="[]", headers=headers) as r:
                results["headers"] = r.status, r.headers.get("WWW-Authenticate"), r.headers.get("Content-Type")
            return registered, results

    registered, results = run(main())
    assert user in registered["users"]
    assert results["wrong"] == results["empty"] == (401, ACCESS_DENIED)
    assert results["no password"] == results["get wrong"] == (401, ACCESS_DENIED)
    assert results["right"][0] == results["other"][0] == 200 and results["right"][1][0]["successful"]
    assert results["get right"] == (200, {"statusCode": 0, "workitems": []})
    assert results["headers"] == (401, 'Basic realm="GWS"', "application/json")


def test_403_csrf_refusal_is_gws_json(node_modules, tmp_path):
    server = NodeServer(node_modules, tmp_path / "server.log").start()
    try:
        async def main():
            async with aiohttp.ClientSession() as http:
                control = Control(server, http)
                off = await get_json(http, f"{server.base}/api/v2/me")
                token = (await control.call("csrf", {"enabled": True}))["token"]
                async with Browser(server, ("agent", "pw")) as browser:
                    refused = await browser.post(browser.message("/meta/handshake", version="1.0"))
                    me = await get_json(http, f"{server.base}/api/v2/me", ("agent", "pw"))
                    items = await get_json(http, f"{server.base}/api/v2/me/workitems?fields=*", ("agent", "pw"))
                    accepted = await browser.post(browser.message("/meta/handshake", version="1.0"),
                                                  headers={"X-CSRF-TOKEN": token})
                state = await control.call("csrf")
                log = await control.call("log")
            return off, token, refused, me, items, accepted, state, log

        off, token, refused, me, items, accepted, state, log = run(main())
    finally:
        server.stop()
    assert off[0] == 404 and off[2]["statusCode"] == 6  # CSRF off: no /api/v2/me, as before
    assert refused == (403, CSRF_REFUSED) and "csrf token" in json.dumps(refused[1]).lower()
    for status, headers, body in (me, items):
        assert status == 200 and body["statusCode"] == 0
        assert headers["X-CSRF-HEADER"] == "X-CSRF-TOKEN" and headers["X-CSRF-TOKEN"] == token
    assert me[2]["user"]["userName"] == "agent" and items[2]["workitems"] == []
    assert accepted[0] == 200 and accepted[1][0]["successful"]
    assert state["refused"] == 1 and state["fetches"] == 1
    assert [e["status"] for e in log] == [403, 200]


# -- GWS workitems (Recovering Existing State) -----------------------------------------------------

def test_workitems_follow_published_notifications(cometd):
    user, other = login(), login()
    url = f"{cometd.base}/api/v2/me/workitems"
    invited = {"state": "Invited", "capabilities": ["Accept", "Reject"], "workitemType": "Email",
               "uri": "http://gws/api/v2/me/workitems/w-1", "userData": {"Subject": "Rückerstattung"}}
    processing = {"state": "Processing", "capabilities": ["Transfer", "AttachUserData", "Complete"]}

    async def main():
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            seen = []

            async def step(*notifications):
                published = await control.publish(list(notifications), user=user)
                status, _, body = await get_json(http, f"{url}?fields=*", (user, "pw"))
                assert status == 200 and body["statusCode"] == 0, body
                seen.append(body["workitems"])
                return published

            lost = await step(workitem(1, "w-1", **invited))  # no session: lost, yet the state is GWS's
            await step(workitem(2, "w-1", **processing))
            await step(workitem(3, "w-1", "PropertiesUpdated", userData={"Subject": "x", "Case": "7"}))
            await step({"messageType": "WorkitemStateChangeMessage", "notificationType": "Error",
                        "referenceId": 4, "errorCode": 1, "errorMessage": "nope", "workitem": {"id": "w-1"}})
            await step(workitem(5, "w-2", state="Invited", workitemType="Chat"))
            await step(workitem(6, "w-1", state="Completed", capabilities=[]))
            mine = await control.workitems(user)
            others = await get_json(http, url, (other, "pw"))
            await step(workitem(7, "w-2", state="Revoked"))
            replaced = await control.set_workitems(user, [{"id": "w-9", "state": "Processing"}])
            after_set = await get_json(http, url, (user, "pw"))
            everyone = await control.workitems()
            await control.fail_workitems(user, status=500, count=2)
            failures = [(await get_json(http, f"{url}?fields=*", (user, "pw")))[::2] for _ in range(3)]
            await control.fail_workitems(user, status=503)
            unavailable = (await get_json(http, url, (user, "pw")))[::2]
            return lost, seen, mine, others, replaced, after_set, everyone, failures, unavailable

    lost, seen, mine, others, replaced, after_set, everyone, failures, unavailable = run(main())
    assert lost["sessions"] == []
    first = seen[0][0]
    assert seen[0] == [{"id": "w-1", **invited, "receivedDate": first["receivedDate"]}]
    assert GWS_DATE.match(first["receivedDate"])
    assert seen[1] == [{**first, **processing}]  # merged; receivedDate kept
    assert seen[2] == [{**first, **processing, "userData": {"Subject": "x", "Case": "7"}}]
    assert seen[3] == seen[2]  # an Error notification changes nothing
    assert [w["id"] for w in seen[4]] == ["w-1", "w-2"] and seen[4][1]["state"] == "Invited"
    assert [w["id"] for w in seen[5]] == ["w-2"] and mine == seen[5]  # Completed leaves the list
    assert others[2] == {"statusCode": 0, "workitems": []}
    assert seen[6] == []  # Revoked too
    assert replaced == [{"id": "w-9", "state": "Processing"}] == after_set[2]["workitems"]
    assert everyone[user] == replaced
    assert [status for status, _ in failures] == [500, 500, 200]
    assert failures[0][1]["statusCode"] == 4 and failures[0][1]["statusMessage"]
    assert failures[2][1] == {"statusCode": 0, "workitems": replaced}
    assert unavailable[0] == 503 and unavailable[1]["statusCode"] == 4


# -- the command line: timeouts, https -------------------------------------------------------------

def test_timeout_and_max_interval_options(node_modules, tmp_path):
    server = NodeServer(node_modules, tmp_path / "server.log", timeout=400, max_interval=300).start()
    try:
        async def main():
            async with aiohttp.ClientSession() as http:
                control = Control(server, http)
                async with Browser(server, ("agent", "pw")) as browser:
                    handshake = await browser.handshake({"ack": True})
                    await browser.subscribe()
                    await browser.connect(ack=-1)
                    held, _ = await browser.connect(ack=browser.batch, timeout=None)  # answered after 400 ms

                    async def expired():  # no connect within maxInterval: the session is swept away
                        return browser.client_id not in {s["id"] for s in await control.call("sessions")}
                    await eventually(expired, "the session to expire")
                    lost = await control.publish([notification(0)], user="agent")
                    gone, _ = await browser.connect(ack=browser.batch)
                log = await control.call("log")
            return handshake, held, lost, gone, log

        handshake, held, lost, gone, log = run(main())
    finally:
        server.stop()
    assert handshake["advice"]["timeout"] == 400
    entry = [e for e in log if e["messages"][0]["channel"] == "/meta/connect"][1]
    assert held["successful"] and 400 <= entry["tEnd"] - entry["tIn"] < 1400
    assert lost == {"published": 1, "sessions": []}
    assert gone["error"] == "402::session_unknown" and gone["advice"] == UNKNOWN_ADVICE


def test_https_with_tls(node_modules, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    issued.cert_chain_pems[0].write_to_path(cert)
    for pem in issued.cert_chain_pems[1:]:
        pem.write_to_path(cert, append=True)
    issued.private_key_pem.write_to_path(key)
    server = NodeServer(node_modules, tmp_path / "server.log", tls=(cert, key)).start()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    try:
        async def main():
            recorder = Recorder()
            async with jar_session(connector=aiohttp.TCPConnector(ssl=context)) as http:
                control = Control(server, http)
                async with BayeuxClient(server.url, [CHANNEL], recorder, session=http, auth=("agent", "pw"),
                                        backoff_base=0.02, backoff_cap=0.2) as client:
                    await control.wait_subscribed(client)
                    await control.publish([notification(i) for i in range(3)], user="agent")
                    await recorder.wait_for(3)
                    items = await get_json(http, f"{server.base}/api/v2/me/workitems?fields=*", ("agent", "pw"))
                    old = client.client_id
                    server.kill()  # and again on the same port, still https
                    server.start()
                    await control.wait_subscribed(client, not_id=old)
                    await control.publish([notification(3)], user="agent")
                    await recorder.wait_for(4)
            async with aiohttp.ClientSession() as untrusting:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await untrusting.get(f"{server.base}/control/ping")
            return recorder, items

        recorder, items = run(main())
    finally:
        server.stop()
    assert server.base.startswith("https://127.0.0.1:") and server.url.startswith("https://")
    assert recorder.refs() == [0, 1, 2, 3]
    assert items[0] == 200 and [w["id"] for w in items[2]["workitems"]] == ["w-0", "w-1", "w-2"]
