"""The GWS simulator (store/ingest/gws_simulator.py), driven by the Bayeux client itself.

What a GWS client meets: Basic auth (401), CSRF (403 until the token of GET /api/v2/me is sent),
CometD with the ack extension (in-order delivery, unacknowledged batches sent again), one topic
per agent, 402 for a session the server forgot.  The expected messages are those of the seeded
``store.simulate.Simulator`` the server publishes from.  Tests synchronise on the callback and
on polling with a deadline, never on sleeps.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from cometd_server import DEADLINE, Recorder, eventually

from store.ingest.bayeux import BayeuxClient, BayeuxError
from store.ingest.gws_simulator import CSRF_ERROR, GwsSimulator
from store.simulate import CHANNEL, Simulator

PASSWORD = "s3cret"


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def expected(agents: int, seed: int, events: int) -> dict[str, list[dict]]:
    """Each agent's messages, in order, as the simulator publishes them."""
    mine: dict[str, list[dict]] = {}
    for source, message in Simulator(agents=agents, seed=seed).messages(events):
        mine.setdefault(source, []).append(message)
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


def new_http() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def client_for(http, gws, agent, recorder, **options) -> BayeuxClient:
    token = await csrf_headers(http, gws, agent)
    options = {"backoff_base": 0.01, "backoff_cap": 0.1, **options}
    return BayeuxClient(gws.notifications_url, [CHANNEL], recorder, session=http, auth=(agent, PASSWORD),
                        headers=lambda: token, **options)


def test_auth_and_csrf_are_required():
    async def main():
        errors = []
        async with GwsSimulator(agents=2, password=PASSWORD, events=0) as gws, new_http() as http:
            async with http.get(gws.url + "/api/v2/me", headers=basic("agent-001", "wrong")) as response:
                wrong = response.status, response.headers.get("WWW-Authenticate")
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
    assert wrong == (401, 'Basic realm="GWS simulator"') and nobody == 401
    assert status == 200 and user["statusCode"] == 0 and user["user"]["userName"] == "agent-002"
    assert headers["X-CSRF-HEADER"] == "X-CSRF-TOKEN" and len(headers["X-CSRF-TOKEN"]) >= 16 and jsession
    assert errors[0][0] == 401
    assert errors[1:] == [(403, CSRF_ERROR), (403, CSRF_ERROR)]


def test_one_agent_receives_its_notifications_in_order_and_acknowledges():
    want = expected(3, 5, 300)["agent-002"]

    async def main():
        recorder = Recorder()
        async with GwsSimulator(agents=3, seed=5, password=PASSWORD, events=300, rate=3000) as gws, \
                new_http() as http:
            async with await client_for(http, gws, "agent-002", recorder) as client:
                await recorder.wait_for(len(want))
                await gws.finished.wait()
                session = gws.sessions[client.client_id]
                # The next connect acknowledges the last batch: nothing is left to send again.
                await eventually(lambda: not session.unacked, "the last batch to be acknowledged")
                batches = session.batch
            return recorder, client, gws, batches

    recorder, client, gws, batches = run(main())
    assert recorder.messages() == want
    assert all(json.loads(raw) == message for message, raw in recorder.committed)
    assert gws.published["agent-002"] == len(want) and sum(gws.published.values()) == 300
    assert client.ack_enabled and client.handshakes == 1 and client.failures == 0
    assert gws.resent == 0 and batches >= 1 and not gws.sessions  # disconnected at the end


def test_unacknowledged_batches_are_sent_again():
    want = expected(1, 2, 120)["agent-001"]
    failed = []

    def fail(batch):  # the store fails once, on the second batch
        if len(failed) == 0 and any(m["id"] == want[0]["id"] for m, _ in batch):
            return False
        if len(failed) < 2:
            failed.append([m for m, _ in batch])
            return True
        return False

    async def main():
        recorder = Recorder(fail)
        async with GwsSimulator(agents=1, seed=2, password=PASSWORD, events=120, rate=400) as gws, \
                new_http() as http:
            async with await client_for(http, gws, "agent-001", recorder) as client:
                await recorder.wait_for(len(want))
            return recorder, client, gws

    recorder, client, gws = run(main())
    assert recorder.messages() == want  # every message committed once, in order
    assert len(failed) == 2 and failed[1][: len(failed[0])] == failed[0]  # the same batch, again
    attempts = [[m for m, _ in batch] for batch in recorder.attempts]
    assert attempts[attempts.index(failed[0]) + 2][: len(failed[0])] == failed[0]
    assert client.callback_failures == 2 and gws.resent >= 2 * len(failed[0])


def test_several_agents_each_receive_only_their_own():
    agents, events = 6, 600
    want = expected(agents, 9, events)

    async def main():
        names = [f"agent-{i:03d}" for i in range(1, agents + 1)]
        recorders = {name: Recorder() for name in names}
        async with GwsSimulator(agents=agents, seed=9, password=PASSWORD, events=events, rate=5000) as gws:
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
        return recorders, clients

    recorders, clients = run(main())
    for name, recorder in recorders.items():
        assert recorder.messages() == want[name]
    assert all(c.handshakes == 1 and c.failures == 0 for c in clients)


def test_an_unknown_client_gets_402_and_handshakes_again():
    want = expected(1, 4, 200)["agent-001"]

    async def main():
        recorder = Recorder()
        async with GwsSimulator(agents=1, seed=4, password=PASSWORD, events=200, rate=400) as gws, \
                new_http() as http:
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
                                     json=[{"channel": "/meta/connect", "id": "9", "clientId": old,
                                            "connectionType": "long-polling"}]) as response:
                    status, [reply] = response.status, await response.json()
                await eventually(lambda: recorder.messages()[-3:] == want[-3:], "the last messages")
            return recorder, client, old, new, status, reply

    recorder, client, old, new, status, reply = run(main())
    assert status == 200 and reply == {"channel": "/meta/connect", "id": "9", "successful": False,
                                       "error": "402::session_unknown",
                                       "advice": {"reconnect": "handshake", "interval": 0}}
    assert client.handshakes == 2 and new != old
    # At least once: what the lost session had not had acknowledged comes again, in order;
    # nothing is missing.
    got = recorder.messages()
    extra = len(got) - len(want)
    assert extra >= 0 and any(got[:k] == want[:k] and got[k:] == want[k - extra:] for k in range(extra, len(got)))


def test_bayeux_rules():
    """A handshake travels alone; only the agent's own workitems topic; no other agent's session."""
    async def main():
        async with GwsSimulator(agents=2, password=PASSWORD, events=0, csrf=False) as gws, new_http() as http:
            async def post(messages, agent="agent-001"):
                async with http.post(gws.notifications_url, json=messages,
                                     headers=basic(agent)) as response:
                    return response.status, (await response.json() if response.status == 200 else None)

            handshake = {"channel": "/meta/handshake", "id": "1", "version": "1.0",
                         "supportedConnectionTypes": ["long-polling"], "ext": {"ack": True}}
            together = await post([handshake, {"channel": "/meta/connect", "id": "2"}])
            status, [hs] = await post([handshake])
            cid = hs["clientId"]
            _, subscribed = await post([{"channel": "/meta/subscribe", "id": "3", "clientId": cid,
                                         "subscription": s} for s in (CHANNEL, "/v2/me/calls", "/v2/users/x")])
            _, [foreign] = await post([{"channel": "/meta/subscribe", "id": "4", "clientId": cid,
                                        "subscription": CHANNEL}], agent="agent-002")
            _, [connect] = await post([{"channel": "/meta/connect", "id": "5", "clientId": cid,
                                        "connectionType": "long-polling", "advice": {"timeout": 0},
                                        "ext": {"ack": -1}}])
            return together, status, hs, subscribed, foreign, connect

    together, status, hs, subscribed, foreign, connect = run(main())
    assert together[0] == 400
    assert status == 200 and hs["successful"] and hs["ext"] == {"ack": True}
    assert hs["advice"] == {"reconnect": "retry", "interval": 0, "timeout": 30_000}
    assert [r["successful"] for r in subscribed] == [True, False, False]
    assert subscribed[1]["error"] == "403:/v2/me/calls:subscription denied"
    assert foreign["error"] == "402::session_unknown" and foreign["advice"]["reconnect"] == "handshake"
    assert connect["successful"] and connect["ext"] == {"ack": 1}


def test_simulate_server_command(tmp_path):
    """`workitem-store simulate-server`: listens on 127.0.0.1, password from --password-env
    ("demo" when the variable is unset), stops on SIGINT."""
    import os
    import re
    import select
    import signal
    import subprocess
    import sys
    import urllib.request
    from base64 import b64encode

    def serve(*args, env=None):
        command = [sys.executable, "-m", "store", "simulate-server", "--port", "0", "--events", "5", "--rate", "0"]
        return subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})

    def me(url, password):
        request = urllib.request.Request(url + "/api/v2/me", headers={
            "Authorization": "Basic " + b64encode(f"agent-002:{password}".encode()).decode()})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())["user"]["userName"]
        except urllib.error.HTTPError as exc:
            return exc.code, None

    results = []
    for args, env, password in [(["--password-env", "SIM_PW", "--agents", "2"], {"SIM_PW": "pw1"}, "pw1"),
                                (["--password-env", "SIM_PW_UNSET", "--no-csrf"], {}, "demo")]:
        process = serve(*args, env=env)
        try:
            ready, _, _ = select.select([process.stdout], [], [], DEADLINE)
            line = process.stdout.readline() if ready else ""
            url = re.search(r"at (http://127\.0\.0\.1:\d+)", line).group(1)
            results.append((line, me(url, password), me(url, password + "x")))
        finally:
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=DEADLINE)
        assert process.returncode == 0 and "published 5 notifications" in err, err
    (first, ok, wrong), (second, ok2, _) = results
    assert ok == (200, "agent-002") and wrong == (401, None) and ok2 == (200, "agent-002")
    assert "password from $SIM_PW" in first and "CSRF on" in first
    assert "password demo ($SIM_PW_UNSET is unset or empty)" in second and "CSRF off" in second
