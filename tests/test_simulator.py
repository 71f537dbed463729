"""The GWS simulator (store/gws_simulator.py), driven by the Bayeux client itself and by
raw Bayeux requests where the exact wire matters.

What a GWS client meets: Basic auth (401) and CSRF (403) with GWS JSON error bodies, CometD
with queues per session only (a message published while the agent has no session is lost;
unacknowledged messages die with their session), deliveries without ids, the ack extension in
three modes, multiple-clients advice for two sessions on one browser cookie, both wordings of
402, GET /api/v2/me/workitems following the stream, TLS, and publishing that waits for the
agents' sessions.  The expected messages are those of the seeded ``store.simulate.Simulator``
the server publishes from.  Tests synchronise on the callback and on polling with a deadline,
never on sleeps.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import ssl

import aiohttp
import pytest
from cometd_server import DEADLINE, Recorder, eventually

from store.gws_protocol import CHANNEL, CSRF_ERROR
from store.gws_simulator import GwsSimulator
from store.ingest.bayeux import BayeuxClient
from store.ingest.bayeux_transport import BayeuxError
from store.simulate import Simulator

PASSWORD = "s3cret"
HANDSHAKE = {"channel": "/meta/handshake", "version": "1.0", "supportedConnectionTypes": ["long-polling"]}


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def stream(agents: int, seed: int, events: int) -> list[tuple[str, str, dict]]:
    """(source, received_at, Bayeux message) as the server's own Simulator makes them: no
    duplicates; the message still with its Bayeux id."""
    lines = Simulator(agents=agents, seed=seed, duplicate_rate=0).lines(events, "envelope")
    return [(e["source"], e["received_at"], e["message"]) for e in map(json.loads, lines)]


def without_id(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "id"}


def expected(agents: int, seed: int, events: int) -> dict[str, list[dict]]:
    """Each agent's messages, in order, as the simulator publishes them (without Bayeux ids)."""
    mine: dict[str, list[dict]] = {}
    for source, _, message in stream(agents, seed, events):
        mine.setdefault(source, []).append(without_id(message))
    return mine


async def csrf_headers(http: aiohttp.ClientSession, gws: GwsSimulator, agent: str) -> dict[str, str]:
    """GET /api/v2/me as the agent: the CSRF header it names, with its token."""
    async with http.get(gws.url + "/api/v2/me", headers=basic(agent)) as response:
        assert response.status == 200
        user = await response.json()
        assert user["user"]["userName"] == agent
        name = response.headers["X-CSRF-HEADER"]
        return {name: response.headers[name]}


def basic(agent: str, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(agent, password)}


def new_http(**options) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), **options)


async def client_for(http, gws, agent, recorder, **options) -> BayeuxClient:
    token = await csrf_headers(http, gws, agent)
    options = {"backoff_base": 0.01, "backoff_cap": 0.1, **options}
    return BayeuxClient(gws.notifications_url, [CHANNEL], recorder, session=http, auth=(agent, PASSWORD),
                        headers=lambda: token, **options)


class Raw:
    """Bayeux by hand, as one browser (one cookie jar) of one agent: for the exact wire."""

    def __init__(self, http: aiohttp.ClientSession, gws: GwsSimulator, agent: str = "agent-001"):
        self.http, self.gws, self.agent, self.next_id = http, gws, agent, 0

    async def post(self, *messages: dict, status: int = 200):
        async with self.http.post(self.gws.notifications_url, json=list(messages),
                                  headers=basic(self.agent)) as response:
            assert response.status == status, await response.text()
            return await response.json()

    def message(self, channel: str, **fields) -> dict:
        self.next_id += 1
        return {"channel": channel, "id": str(self.next_id), **fields}

    async def handshake(self, ack: bool = True) -> dict:
        [reply] = await self.post(self.message(**HANDSHAKE, **({"ext": {"ack": True}} if ack else {})))
        assert reply["successful"], reply
        return reply

    async def subscribe(self, client_id: str) -> None:
        [reply] = await self.post(self.message("/meta/subscribe", clientId=client_id, subscription=CHANNEL))
        assert reply["successful"], reply

    async def connect(self, client_id: str, ack: int | None = None, timeout: int | None = 0) -> tuple[list, dict]:
        """(deliveries, the connect reply); ``timeout`` 0 (as after a handshake): answered at once."""
        message = self.message("/meta/connect", clientId=client_id, connectionType="long-polling")
        if timeout is not None:
            message["advice"] = {"timeout": timeout}
        if ack is not None:
            message["ext"] = {"ack": ack}
        *deliveries, reply = await self.post(message)
        assert reply["channel"] == "/meta/connect" and not any(m["channel"].startswith("/meta/") for m in deliveries)
        return deliveries, reply


# -- HTTP: auth, CSRF, error bodies ---------------------------------------------------------------

def test_auth_and_csrf_are_required():
    async def main():
        errors = []
        async with GwsSimulator(agents=2, password=PASSWORD, events=0) as gws, new_http() as http:
            async with http.get(gws.url + "/api/v2/me", headers=basic("agent-001", "wrong")) as response:
                wrong = response.status, response.headers.get("WWW-Authenticate"), await response.json()
            async with http.get(gws.url + "/api/v2/me", headers=basic("agent-003")) as response:
                nobody = response.status
            async with http.get(gws.url + "/api/v2/me", headers=basic("agent-002")) as response:
                me = response.status, await response.json(), dict(response.headers)
                jsession = response.cookies["JSESSIONID"].value
            for auth, headers in [(("agent-001", "wrong"), {}), (("agent-002", PASSWORD), {}),
                                  (("agent-002", PASSWORD), {"X-CSRF-TOKEN": "forged"})]:
                client = BayeuxClient(gws.notifications_url, [CHANNEL], Recorder(), session=http, auth=auth,
                                      headers=lambda h=headers: h,
                                      on_http_error=lambda status, body: errors.append((status, body)))
                with pytest.raises(BayeuxError, match=r"HTTP 40[13]"):
                    await client.run()
                assert client.handshakes == 0
        return wrong, nobody, me, jsession, errors

    wrong, nobody, (status, user, headers), jsession, errors = run(main())
    assert wrong == (401, 'Basic realm="GWS simulator"', {"statusCode": 20, "statusMessage": "Access denied"})
    assert nobody == 401
    assert status == 200 and user["statusCode"] == 0 and user["user"]["userName"] == "agent-002"
    assert headers["X-CSRF-HEADER"] == "X-CSRF-TOKEN" and len(headers["X-CSRF-TOKEN"]) >= 16 and jsession
    assert errors[0][0] == 401 and json.loads(errors[0][1])["statusCode"] == 20
    csrf_refusal = {"statusCode": 20, "statusMessage": CSRF_ERROR}
    assert [(s, json.loads(body)) for s, body in errors[1:]] == [(403, csrf_refusal)] * 2
    assert all("csrf token" in body.lower() for _, body in errors[1:])  # what clients look for


def test_errors_are_gws_json_bodies():
    async def main():
        got = {}
        async with GwsSimulator(agents=1, password=PASSWORD, events=0, csrf=False) as gws, new_http() as http:
            async def ask(name, method, path, **options):
                async with http.request(method, gws.url + path, **options) as response:
                    got[name] = (response.status, response.content_type, await response.json(),
                                 response.headers.get("WWW-Authenticate"))

            await ask("401", "GET", "/api/v2/me")
            await ask("404", "GET", "/api/v2/nothing", headers=basic("agent-001"))
            await ask("405", "GET", "/api/v2/notifications", headers=basic("agent-001"))
            await ask("400", "POST", "/api/v2/notifications", headers=basic("agent-001"), data="not json")
            await ask("500", "POST", "/api/v2/notifications", headers=basic("agent-001"),
                      json=[{**HANDSHAKE, "id": "1"}, {"channel": "/meta/connect", "id": "2"}])
        async with GwsSimulator(agents=1, password=PASSWORD, events=0) as gws, new_http() as http:
            await ask("403", "POST", "/api/v2/notifications", headers=basic("agent-001"), json=[HANDSHAKE])
        return got

    got = run(main())
    assert got["401"] == (401, "application/json", {"statusCode": 20, "statusMessage": "Access denied"},
                          'Basic realm="GWS simulator"')
    assert got["403"] == (403, "application/json", {"statusCode": 20, "statusMessage": CSRF_ERROR}, None)
    for status, code in [("400", 2), ("404", 6), ("405", 3), ("500", 4)]:
        http_status, content_type, body, _ = got[status]
        assert (http_status, content_type) == (int(status), "application/json"), status
        assert body["statusCode"] == code and isinstance(body["statusMessage"], str) and body["statusMessage"]


# -- delivery -----------------------------------------------------------------------------------

def test_one_agent_receives_its_notifications_in_order_without_ids_and_acknowledges():
    want = expected(1, 5, 300)["agent-001"]

    async def main():
        recorder = Recorder()
        async with GwsSimulator(agents=1, seed=5, password=PASSWORD, events=300, rate=3000,
                                wait_for_sessions=True) as gws, new_http() as http:
            async with await client_for(http, gws, "agent-001", recorder) as client:
                await recorder.wait_for(len(want))
                await gws.finished.wait()
                session = gws.sessions[client.client_id]
                # The next connect acknowledges the last batch: nothing is left to send again.
                await eventually(lambda: not session.unacked, "the last batch to be acknowledged")
                batches = session.batch
            return recorder, client, gws, batches

    recorder, client, gws, batches = run(main())
    assert recorder.messages() == want
    assert all("id" not in message and "id" not in json.loads(raw) for message, raw in recorder.committed)
    assert all("id" in m for _, _, m in stream(1, 5, 300))  # the Simulator's ids were stripped
    assert all(json.loads(raw) == message for message, raw in recorder.committed)
    assert gws.published == gws.delivered == {"agent-001": 300} and gws.lost == {"agent-001": 0}
    assert client.ack_enabled and client.handshakes == 1 and client.failures == 0
    assert gws.resent == 0 and batches >= 1 and not gws.sessions  # disconnected at the end
    assert gws.discarded == {"agent-001": 0}


def test_unacknowledged_batches_are_sent_again_within_the_session():
    want = expected(1, 2, 120)["agent-001"]
    failed = []

    def fail(batch):  # the store fails twice, on the second batch
        if len(failed) == 0 and any(m == want[0] for m, _ in batch):
            return False
        if len(failed) < 2:
            failed.append([m for m, _ in batch])
            return True
        return False

    async def main():
        recorder = Recorder(fail)
        async with GwsSimulator(agents=1, seed=2, password=PASSWORD, events=120, rate=400,
                                wait_for_sessions=True) as gws, new_http() as http:
            async with await client_for(http, gws, "agent-001", recorder) as client:
                await recorder.wait_for(len(want))
            return recorder, client, gws

    recorder, client, gws = run(main())
    assert recorder.messages() == want  # every message committed once, in order
    assert len(failed) == 2 and failed[1][: len(failed[0])] == failed[0]  # the same batch, again
    attempts = [[m for m, _ in batch] for batch in recorder.attempts]
    assert attempts[attempts.index(failed[0]) + 2][: len(failed[0])] == failed[0]
    assert client.callback_failures == 2 and gws.resent >= 2 * len(failed[0])
    assert client.handshakes == 1 and gws.lost == {"agent-001": 0}


def test_several_agents_each_receive_only_their_own():
    agents, events = 6, 600
    want = expected(agents, 9, events)

    async def main():
        names = [f"agent-{i:03d}" for i in range(1, agents + 1)]
        recorders = {name: Recorder() for name in names}
        async with GwsSimulator(agents=agents, seed=9, password=PASSWORD, events=events, rate=5000,
                                wait_for_sessions=True) as gws:
            https = [new_http() for _ in names]
            clients = [await client_for(http, gws, name, recorders[name])
                       for http, name in zip(https, names, strict=True)]
            try:
                for client in clients:
                    client.start()
                await asyncio.gather(*(recorders[n].wait_for(len(want[n])) for n in names))
                await gws.finished.wait()
            finally:
                await asyncio.gather(*(client.stop() for client in clients))
                await asyncio.gather(*(http.close() for http in https))
        return recorders, clients, gws

    recorders, clients, gws = run(main())
    for name, recorder in recorders.items():
        assert recorder.messages() == want[name]
    assert all(c.handshakes == 1 and c.failures == 0 for c in clients)
    assert sum(gws.lost.values()) == 0 and gws.delivered == gws.published


def test_publishing_waits_for_every_agents_session():
    want = expected(2, 6, 60)

    async def main():
        recorders = {"agent-001": Recorder(), "agent-002": Recorder()}
        async with GwsSimulator(agents=2, seed=6, password=PASSWORD, events=60, rate=0,
                                wait_for_sessions=True) as gws, new_http() as one, new_http() as two:
            first = await client_for(one, gws, "agent-001", recorders["agent-001"])
            second = await client_for(two, gws, "agent-002", recorders["agent-002"])
            async with first:
                # agent-001 listens and waits in a held connect; agent-002 has no session yet.
                await eventually(lambda: first.client_id in gws.sessions
                                 and gws.sessions[first.client_id].holding, "agent-001 to wait")
                before = (dict(gws.published), gws.publishing.is_set())
                async with second:
                    await asyncio.gather(*(recorders[n].wait_for(len(want[n])) for n in want))
            return recorders, before, gws

    recorders, (published_before, publishing_before), gws = run(main())
    assert published_before == {"agent-001": 0, "agent-002": 0} and not publishing_before
    assert {n: r.messages() for n, r in recorders.items()} == want
    assert gws.lost == {"agent-001": 0, "agent-002": 0} and gws.published == gws.delivered


def test_what_is_published_while_no_session_listens_is_lost():
    async def main():
        async with GwsSimulator(agents=2, seed=3, password=PASSWORD, events=40, rate=0, csrf=False) as gws, \
                new_http() as http:
            await gws.finished.wait()
            raw = Raw(http, gws)
            hs = await raw.handshake()
            await raw.subscribe(hs["clientId"])
            deliveries, reply = await raw.connect(hs["clientId"], ack=-1)
            return gws, deliveries, reply

    gws, deliveries, reply = run(main())
    counts = {n: len(m) for n, m in expected(2, 3, 40).items()}
    assert gws.published == counts and gws.lost == counts  # nobody listened: all lost
    assert gws.delivered == {"agent-001": 0, "agent-002": 0}
    assert deliveries == [] and reply["successful"]  # a new session starts empty


def test_unacknowledged_messages_die_with_their_session():
    """Within a session an unacknowledged batch comes again; a new session of the same agent
    (same browser) gets none of it."""
    want = expected(1, 8, 30)["agent-001"]

    async def main():
        async with GwsSimulator(agents=1, seed=8, password=PASSWORD, events=30, rate=0, csrf=False,
                                wait_for_sessions=True) as gws, new_http() as http:
            raw = Raw(http, gws)
            old = (await raw.handshake())["clientId"]
            await raw.subscribe(old)
            await gws.finished.wait()
            first, reply1 = await raw.connect(old, ack=-1)
            again, reply2 = await raw.connect(old, ack=0)  # batch 1 not acknowledged: sent again
            resent = gws.resent
            gws.expire(old)
            discarded = dict(gws.discarded)
            new = (await raw.handshake())["clientId"]
            await raw.subscribe(new)
            after, reply3 = await raw.connect(new, ack=-1)
            [stale] = await raw.post(raw.message("/meta/connect", clientId=old, connectionType="long-polling"))
            return first, reply1, again, reply2, resent, discarded, after, reply3, stale

    first, reply1, again, reply2, resent, discarded, after, reply3, stale = run(main())
    assert first == want and again == want and resent == len(want)
    assert reply1["ext"] == {"ack": 1} and reply2["ext"] == {"ack": 2}
    assert discarded == {"agent-001": len(want)}
    assert after == [] and reply3["successful"] and reply3["ext"] == {"ack": 1}
    assert stale["error"] == "402::session_unknown"


def test_a_session_without_connects_expires_with_its_queue():
    async def main():
        async with GwsSimulator(agents=1, seed=15, password=PASSWORD, events=10, rate=0, csrf=False,
                                max_interval=300, wait_for_sessions=True) as gws, new_http() as http:
            raw = Raw(http, gws)
            cid = (await raw.handshake())["clientId"]
            await raw.subscribe(cid)  # the publisher starts, and the session never connects
            await gws.finished.wait()
            await eventually(lambda: cid not in gws.sessions, "the session to expire")
            [reply] = await raw.post(raw.message("/meta/connect", clientId=cid, connectionType="long-polling"))
            return gws, reply

    gws, reply = run(main())
    assert gws.published == gws.discarded == {"agent-001": 10} and gws.delivered == {"agent-001": 0}
    assert reply["error"] == "402::session_unknown" and reply["advice"] == {"reconnect": "handshake", "interval": 0}


@pytest.mark.parametrize("java_402", [False, True], ids=["node-402", "java-402"])
def test_an_unknown_client_gets_402_and_handshakes_again(java_402):
    want = expected(1, 4, 200)["agent-001"]
    wording = "402::Unknown client" if java_402 else "402::session_unknown"

    async def main():
        recorder = Recorder()
        async with GwsSimulator(agents=1, seed=4, password=PASSWORD, events=200, rate=400, java_402=java_402,
                                wait_for_sessions=True) as gws, new_http() as http:
            async with await client_for(http, gws, "agent-001", recorder) as client:
                await recorder.wait_for(20)
                old = client.client_id
                gws.expire(old)
                new = await eventually(lambda: client.client_id not in (None, old) and client.client_id
                                       in gws.sessions and gws.sessions[client.client_id].subscribed and
                                       client.client_id, "a new session")
                # What the old session now gets, asked directly.
                token = await csrf_headers(http, gws, "agent-001")
                async with http.post(gws.notifications_url, headers=basic("agent-001") | token,
                                     json=[{"channel": "/meta/subscribe", "id": "8", "clientId": old,
                                            "subscription": CHANNEL}]) as response:
                    [subscribe] = await response.json()
                async with http.post(gws.notifications_url, headers=basic("agent-001") | token,
                                     json=[{"channel": "/meta/connect", "id": "9", "clientId": old,
                                            "connectionType": "long-polling"}]) as response:
                    status, [reply] = response.status, await response.json()
                await gws.finished.wait()
                await eventually(lambda: not gws.sessions[new].unacked and not gws.sessions[new].queue,
                                 "the last batch to be sent and acknowledged")
                assert len(recorder.committed) >= gws.delivered["agent-001"] - gws.discarded["agent-001"]
            return recorder, client, old, new, status, reply, subscribe, gws

    recorder, client, old, new, status, reply, subscribe, gws = run(main())
    assert status == 200 and reply == {"channel": "/meta/connect", "id": "9", "successful": False,
                                       "error": wording, "advice": {"reconnect": "handshake", "interval": 0}}
    # 402 advice only on handshake and connect replies (Java unknownSession, Node _unknown).
    assert subscribe == {"channel": "/meta/subscribe", "id": "8", "successful": False, "error": wording}
    assert client.handshakes == 2 and new != old
    # Nothing is sent twice, nothing out of order; what the lost session held or what was
    # published between the sessions is missing: one gap, no longer than lost + discarded.
    got, lost = recorder.messages(), gws.lost["agent-001"] + gws.discarded["agent-001"]
    gap = len(want) - len(got)
    assert 0 <= gap <= lost
    assert any(got[:k] == want[:k] and got[k:] == want[k + gap:] for k in range(20, len(got) + 1))


def test_bayeux_rules():
    """A handshake travels alone; only the agent's own workitems topic; no other agent's session;
    nothing for another browser's session."""
    async def main():
        async with GwsSimulator(agents=2, password=PASSWORD, events=0, csrf=False) as gws, \
                new_http() as http, new_http() as other_browser:
            async def post(messages, agent="agent-001", session=http):
                async with session.post(gws.notifications_url, json=messages,
                                        headers=basic(agent)) as response:
                    return response.status, await response.json()

            handshake = {**HANDSHAKE, "id": "1", "ext": {"ack": True}}
            together = await post([handshake, {"channel": "/meta/connect", "id": "2"}])
            status, [hs] = await post([handshake])
            cid = hs["clientId"]
            _, subscribed = await post([{"channel": "/meta/subscribe", "id": "3", "clientId": cid,
                                         "subscription": s} for s in (CHANNEL, "/v2/me/calls", "/v2/users/x")])
            _, [foreign] = await post([{"channel": "/meta/subscribe", "id": "4", "clientId": cid,
                                        "subscription": CHANNEL}], agent="agent-002")
            _, [elsewhere] = await post([{"channel": "/meta/connect", "id": "5", "clientId": cid,
                                          "connectionType": "long-polling"}], session=other_browser)
            _, [connect] = await post([{"channel": "/meta/connect", "id": "6", "clientId": cid,
                                        "connectionType": "long-polling", "advice": {"timeout": 0},
                                        "ext": {"ack": -1}}])
            return together, status, hs, subscribed, foreign, elsewhere, connect

    together, status, hs, subscribed, foreign, elsewhere, connect = run(main())
    assert together[0] == 500 and together[1]["statusCode"] == 4
    assert status == 200 and hs["successful"] and hs["ext"] == {"ack": True}
    assert hs["advice"] == {"reconnect": "retry", "interval": 0, "timeout": 30_000}
    assert [r["successful"] for r in subscribed] == [True, False, False]
    assert subscribed[1]["error"] == "403:/v2/me/calls:subscription denied"
    assert foreign["error"] == "402::session_unknown" and "advice" not in foreign
    assert elsewhere["error"] == "402::session_unknown" and elsewhere["advice"]["reconnect"] == "handshake"
    assert connect["successful"] and connect["ext"] == {"ack": 1}


# -- the ack extension's modes ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["on", "object", "off"])
def test_ack_extension_modes(mode):
    want = expected(1, 11, 12)["agent-001"]

    async def main():
        async with GwsSimulator(agents=1, seed=11, password=PASSWORD, events=12, rate=0, csrf=False, ack=mode,
                                wait_for_sessions=True) as gws, new_http() as http:
            raw = Raw(http, gws)
            hs = await raw.handshake(ack=True)
            cid = hs["clientId"]
            # What a CometD client acknowledges first: -1, or the batch of the handshake reply.
            ext = hs.get("ext", {}).get("ack")
            first_ack = ext["batch"] if isinstance(ext, dict) else -1
            await raw.subscribe(cid)
            await gws.finished.wait()
            one = await raw.connect(cid, ack=first_ack)
            batch = one[1].get("ext", {}).get("ack", 0)
            two = await raw.connect(cid, ack=batch)  # acknowledged: nothing comes again
            without = Raw(http, gws)  # a handshake that does not ask for the extension
            plain = await without.handshake(ack=False)
            return hs, one, two, plain, gws.resent

    hs, (first, reply1), (second, reply2), plain, resent = run(main())
    assert first == want and second == [] and resent == 0
    assert "ext" not in plain
    if mode == "on":
        assert hs["ext"] == {"ack": True}
        assert (reply1["ext"], reply2["ext"]) == ({"ack": 1}, {"ack": 2})
    elif mode == "object":  # Java sendMeta with allowMessageDeliveryDuringHandshake: batch 1 closed
        assert hs["ext"] == {"ack": {"enabled": True, "batch": 1}}
        assert (reply1["ext"], reply2["ext"]) == ({"ack": 2}, {"ack": 3})
    else:
        assert "ext" not in hs and "ext" not in reply1 and "ext" not in reply2


def test_a_client_works_without_the_ack_extension():
    want = expected(1, 12, 80)["agent-001"]

    async def main():
        recorder = Recorder()
        async with GwsSimulator(agents=1, seed=12, password=PASSWORD, events=80, rate=2000, ack="off",
                                wait_for_sessions=True) as gws, new_http() as http:
            async with await client_for(http, gws, "agent-001", recorder) as client:
                await recorder.wait_for(len(want))
            return recorder, client

    recorder, client = run(main())
    assert recorder.messages() == want and not client.ack_enabled and client.handshakes == 1


# -- multiple-clients -----------------------------------------------------------------------------

def test_a_second_session_on_the_same_browser_cookie_gets_multiple_clients_advice():
    async def main():
        async with GwsSimulator(agents=1, password=PASSWORD, events=0, csrf=False, timeout=20_000) as gws, \
                new_http() as browser, new_http() as other_browser:
            a, b, c = Raw(browser, gws), Raw(browser, gws), Raw(other_browser, gws)
            first = (await a.handshake())["clientId"]
            await a.subscribe(first)
            await a.connect(first, ack=-1)
            held = asyncio.create_task(a.connect(first, ack=1, timeout=None))
            await eventually(lambda: gws.sessions[first].holding, "the first session's connect to be held")
            second = (await b.handshake())["clientId"]  # the same BAYEUX_BROWSER cookie
            await b.subscribe(second)
            told = await b.connect(second, ack=-1)
            told_again = await b.connect(second, ack=1, timeout=None)  # would be held: answered at once
            third = (await c.handshake())["clientId"]  # another browser: not concerned
            await c.subscribe(third)
            elsewhere = await c.connect(third, ack=-1)
            await a.post(a.message("/meta/disconnect", clientId=first))
            ended = await held
            alone = await b.connect(second, ack=2)  # the other session is gone: no advice
            cookies = {s.browser for s in gws.sessions.values()}
            return told, told_again, elsewhere, ended, alone, cookies

    (d1, told), (d2, told_again), (_, elsewhere), (_, ended), (_, alone), cookies = run(main())
    multiple = {"multiple-clients": True, "reconnect": "retry", "interval": 2000}
    assert told["successful"] and told["advice"] == multiple and d1 == []
    assert told_again["successful"] and told_again["advice"] == multiple and d2 == []
    assert told["ext"] == {"ack": 1} and told_again["ext"] == {"ack": 2}  # still numbered batches
    assert elsewhere["successful"] and "advice" not in elsewhere
    assert ended["error"] == "402::session_unknown"  # disconnected while held
    assert alone["successful"] and "advice" not in alone
    assert len(cookies) == 2


# -- GET /api/v2/me/workitems -----------------------------------------------------------------------

def gws_date(received_at: str) -> str:
    when = dt.datetime.fromisoformat(received_at.replace("Z", "+00:00"))
    return f"{when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:03d}+0000"


def current(items: list[tuple[str, str, dict]]) -> list[dict]:
    """An agent's current workitems after these (source, received_at, message), as GWS's
    Recovering Existing State describes them: StatusChange and PropertiesUpdated merge the
    workitem's fields, Completed and Revoked leave the list, Error changes nothing."""
    resources: dict[str, dict] = {}
    for _, received_at, message in items:
        data = message["data"]
        if data["notificationType"] not in ("StatusChange", "PropertiesUpdated"):
            continue
        workitem = data["workitem"]
        resource = resources.get(workitem["id"]) or {"receivedDate": gws_date(received_at)}
        resource = resource | workitem
        if resource["state"] in ("Completed", "Revoked"):
            resources.pop(workitem["id"], None)
        else:
            resources[workitem["id"]] = resource
    keys = ["id", "state", "capabilities", "workitemType", "uri", "userData", "receivedDate"]
    return [{k: r[k] for k in keys if k in r} for r in resources.values()]


def test_workitems_endpoint_follows_the_stream():
    """GET /api/v2/me/workitems?fields=* answers what was published up to that moment,
    delivered or lost (no Bayeux session here at all)."""
    agents, seed, events = 3, 13, 600
    by_agent: dict[str, list] = {}
    for item in stream(agents, seed, events):
        by_agent.setdefault(item[0], []).append(item)

    async def main():
        checks, answers = [], []
        async with GwsSimulator(agents=agents, seed=seed, password=PASSWORD, events=events, rate=3000) as gws, \
                new_http() as http:
            async def get(agent, query="?fields=*"):
                before = gws.published[agent]
                async with http.get(gws.url + "/api/v2/me/workitems" + query, headers=basic(agent)) as response:
                    assert response.status == 200 and response.content_type == "application/json"
                    body = await response.json()
                return before, gws.published[agent], body

            while not gws.finished.is_set():
                for agent in by_agent:  # in process: no await between the two reads
                    checks.append((agent, gws.published[agent], gws.current_workitems(agent)))
                answers.append(("agent-002", *await get("agent-002")))
            final = {agent: await get(agent) for agent in by_agent}
            uris = await get("agent-001", "")
            some_fields = await get("agent-001", "?fields=id,state")
            return checks, answers, final, uris, some_fields, gws

    checks, answers, final, uris, some_fields, gws = run(main())
    assert len({n for _, n, _ in checks}) > 5  # seen at many points of the stream
    for agent, n, seen in checks:
        assert seen == current(by_agent[agent][:n]), (agent, n)
    for agent, low, high, body in answers:  # the GET saw the stream at one moment in [low, high]
        assert body["statusCode"] == 0
        assert any(body["workitems"] == current(by_agent[agent][:n]) for n in range(low, high + 1))
    for agent, (_, _, body) in final.items():
        want = current(by_agent[agent])
        assert body == {"statusCode": 0, "workitems": want} and want
        assert all(w["state"] in ("Invited", "Processing") and w["receivedDate"].startswith("2026-11-02 ")
                   for w in want)
    assert gws.published == {a: len(items) for a, items in by_agent.items()} == gws.lost
    assert uris[2] == {"statusCode": 0, "uris": [w["uri"] for w in final["agent-001"][2]["workitems"]]}
    assert some_fields[2]["workitems"] == [{"id": w["id"], "state": w["state"]}
                                           for w in final["agent-001"][2]["workitems"]]


def test_rejected_workitems_are_completed_at_the_rejecting_agent():
    """store.simulate: Reject -> Completed with no capabilities (GWS WorkitemReject), then Invited
    at another agent; a transfer stays Revoked at the first agent, then Invited at another."""
    last: dict[str, tuple[str, str]] = {}  # workitem id -> (agent, state)
    handed_on = {"Reject": [], "Transfer": []}
    for source, _, message in stream(4, 1, 4000):
        data = message["data"]
        if data["notificationType"] != "StatusChange":
            continue
        workitem = data["workitem"]
        state, before = workitem["state"], last.get(workitem["id"])
        assert (before and before[1], state) != ("Invited", "Revoked")  # rejections are no longer Revoked
        if before is not None and before[1] in ("Completed", "Revoked"):
            assert state == "Invited" and source != before[0]  # the next agent, as a new Invited
            handed_on["Reject" if before[1] == "Completed" else "Transfer"].append(workitem["id"])
        if before is not None and (before[1], state) == ("Invited", "Completed"):
            assert workitem["capabilities"] == [] and before[0] == source  # at the rejecting agent
        last[workitem["id"]] = (source, state)
    assert len(handed_on["Reject"]) > 10 and len(handed_on["Transfer"]) > 10


# -- TLS ---------------------------------------------------------------------------------------

def need_trustme():
    """The trustme package (a CA for tests); required under CI."""
    try:
        import trustme
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the trustme package is needed for the TLS tests: pip install trustme")
        pytest.skip("trustme is not installed")
    return trustme


def test_tls():
    trustme = need_trustme()
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    want = expected(1, 14, 50)["agent-001"]

    async def main():
        recorder = Recorder()
        async with GwsSimulator(agents=1, seed=14, password=PASSWORD, events=50, rate=0, ssl_context=server_context,
                                wait_for_sessions=True) as gws:
            async with new_http(connector=aiohttp.TCPConnector(ssl=client_context)) as http:
                async with await client_for(http, gws, "agent-001", recorder) as client:
                    await recorder.wait_for(len(want))
            async with new_http() as untrusting:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await untrusting.get(gws.url + "/api/v2/me", headers=basic("agent-001"))
            return gws.url, recorder, client

    url, recorder, client = run(main())
    assert url.startswith("https://127.0.0.1:")
    assert recorder.messages() == want and client.handshakes == 1


# -- the command --------------------------------------------------------------------------------

def test_simulate_server_command(tmp_path):
    """`workitem-store simulate-server`: listens on 127.0.0.1 (https with --tls-cert/--tls-key),
    password from --password-env ("demo" when the variable is unset), --ack, --java-402,
    --timeout and --max-interval reach the server, stops on SIGINT."""
    import re
    import select
    import signal
    import subprocess
    import sys
    import urllib.request
    from base64 import b64encode

    trustme = need_trustme()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(tmp_path / "cert.pem"), append=True)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)

    def serve(*args, env=None):
        command = [sys.executable, "-m", "store", "simulate-server", "--port", "0", "--events", "5", "--rate", "0"]
        return subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})

    def call(url, password, path="/api/v2/me", body=None):
        request = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", "Authorization": "Basic "
                                                  + b64encode(f"agent-002:{password}".encode()).decode()})
        try:
            with urllib.request.urlopen(request, timeout=5, context=trusting) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def me(url, password):
        status, body = call(url, password)
        return status, body and body["user"]["userName"]

    results = []
    for args, env, password in [
            (["--password-env", "SIM_PW", "--agents", "2", "--tls-cert", str(tmp_path / "cert.pem"),
              "--tls-key", str(tmp_path / "key.pem")], {"SIM_PW": "pw1"}, "pw1"),
            (["--password-env", "SIM_PW_UNSET", "--no-csrf", "--ack", "object", "--java-402",
              "--timeout", "5000", "--max-interval", "3000"], {}, "demo")]:
        process = serve(*args, env=env)
        try:
            ready, _, _ = select.select([process.stdout], [], [], DEADLINE)
            line = process.stdout.readline() if ready else ""
            url = re.search(r"at (https?://127\.0\.0\.1:\d+)", line).group(1)
            handshake = call(url, password, "/api/v2/notifications", [{**HANDSHAKE, "ext": {"ack": True}}])
            unknown = call(url, password, "/api/v2/notifications",
                           [{"channel": "/meta/connect", "clientId": "nobody", "connectionType": "long-polling"}])
            results.append((line, url, me(url, password), me(url, password + "x"), handshake, unknown))
        finally:
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=DEADLINE)
        assert process.returncode == 0 and "published 5 notifications (0 delivered, 5 lost" in err, err
    (first, url1, ok, wrong, hs1, unknown1), (second, url2, ok2, _, (_, [hs2]), (_, [unknown2])) = results
    assert url1.startswith("https://") and url2.startswith("http://")
    assert ok == (200, "agent-002") and wrong == (401, None) and ok2 == (200, "agent-002")
    assert "password from $SIM_PW" in first and "CSRF on" in first and "ack on" in first
    assert "password demo ($SIM_PW_UNSET is unset or empty)" in second and "CSRF off" in second
    assert hs1 == unknown1 == (403, None)  # CSRF on: a POST without the token is refused
    assert hs2["ext"] == {"ack": {"enabled": True, "batch": 1}} and hs2["advice"]["timeout"] == 5000
    assert unknown2["error"] == "402::Unknown client"

    bad = subprocess.run([sys.executable, "-m", "store", "simulate-server", "--tls-cert", str(tmp_path / "cert.pem")],
                         capture_output=True, text=True, timeout=DEADLINE)
    assert bad.returncode == 2 and "--tls-cert and --tls-key go together" in bad.stderr
