"""The Bayeux client (store/ingest/bayeux.py) against the real CometD server for Node.

tests/cometd/server.js runs npm ``cometd-nodejs-server`` (with its ack extension) on 127.0.0.1,
made to behave as the Java CometD 3.1 server behind GWS (queues per session only, no message
ids, Java's 402 wording on request), and adds a control API: publish, list sessions, read the
traffic log with the server's own timestamps, expire a session, change a session's advice, lose a
reply.  The double itself is pinned by tests/test_cometd_double.py.  Tests synchronise on the
callback (an asyncio.Condition) and on polling that API with a deadline, never on sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import socket
import time

import aiohttp
import pytest
from aiohttp import web
from cometd_server import (
    DEADLINE,
    POISON,
    Control,
    NodeServer,
    Recorder,
    eventually,
    notification,
)
from hypothesis import given
from hypothesis import strategies as st

from store.gws_protocol import CHANNEL
from store.ingest.bayeux import UNREADABLE_LIMIT, BayeuxClient
from store.ingest.bayeux_messages import _split, _split_leniently, split_messages
from store.ingest.bayeux_transport import BayeuxError, full_jitter

# The server and its control API: tests/cometd_server.py (fixtures node_modules and cometd:
# tests/conftest.py).


# -- the callback ----------------------------------------------------------------------------------

def client_for(server: NodeServer, recorder: Recorder, **options) -> BayeuxClient:
    options = {"backoff_base": 0.02, "backoff_cap": 0.2, **options}
    return BayeuxClient(server.url, [CHANNEL], recorder, **options)


def connects(traffic: list[dict]) -> list[dict]:
    """The answered /meta/connect requests (one cut short by stop() is never answered)."""
    return [e for e in traffic if e["reply"] is not None
            and any(m["channel"] == "/meta/connect" for m in e["messages"])]


def connect_reply(entry: dict) -> dict:
    return next(m for m in entry["reply"] or [] if m["channel"] == "/meta/connect")


def events(entry: dict) -> list[dict]:
    return [m for m in entry["reply"] or [] if not m["channel"].startswith("/meta/")]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 45))


# -- pure parts ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10)


@given(st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=4), max_size=5),
       st.sampled_from([None, 0, 2]), st.sampled_from([(",", ":"), (", ", ": ")]),
       st.booleans())
def test_split_messages_slices_each_message_exactly(messages, indent, separators, ascii_only):
    text = json.dumps(messages, indent=indent, separators=separators, ensure_ascii=ascii_only)
    items = split_messages(f" \n{text}\r\n")
    assert [m for m, _ in items] == messages
    pos = 0
    for message, raw in items:  # each raw text is the message's own slice, in order
        assert json.loads(raw) == message
        start = text.index(raw, pos)
        assert text[pos:start].strip(" \n\r\t[,") == ""
        pos = start + len(raw)


def test_split_messages_refuses_what_is_not_a_message_array():
    assert split_messages('{"channel": "/a"}') == [({"channel": "/a"}, '{"channel": "/a"}')]
    # The body itself is broken: no element can be told apart (the client retries, see below).
    for bad in ["", "[", "null", "x", "<html>", '[{"a": 1}] x', '[{"a": 1},', '[{"a": "no end]', b"\xff[]"]:
        with pytest.raises(ValueError):
            split_messages(bad)


# -- poison: no message makes split_messages fail, each is handed on with its raw text ------------

CONNECT = '{"channel":"/meta/connect","successful":true,"ext":{"ack":3}}'


def delivery(data: str) -> str:
    return f'{{"channel":"{CHANNEL}","data":{data}}}'


def test_a_message_too_deep_for_the_decoder_is_handed_on_with_a_placeholder():
    deep = delivery("[" * 100_000 + "]" * 100_000)
    started = time.perf_counter()
    items = split_messages(f"[{deep},{CONNECT}]")  # the C decoder raises RecursionError
    assert time.perf_counter() - started < 1.0
    assert items == [({}, deep), (json.loads(CONNECT), CONNECT)]
    assert split_messages(f" [ {CONNECT} , {deep} ] ") == [(json.loads(CONNECT), CONNECT), ({}, deep)]


def test_a_body_that_is_not_utf8_loses_nothing_and_stays_storable():
    bad = delivery('{"note": "caf\xff", "ok": "é"}').encode("latin-1")
    body = b"[" + bad + b"," + CONNECT.encode() + b"]"
    items = split_messages(body)
    assert items == [({}, delivery('{"note": "caf\\xff", "ok": "\\xe9"}')), (json.loads(CONNECT), CONNECT)]
    items[0][1].encode("utf-8")  # storable text: every byte is there, as \xNN
    # A UTF-8 body as bytes is decoded as it is.
    good = delivery('{"note": "café ✓"}')
    assert split_messages(f"[{good}]".encode()) == [(json.loads(good), good)]


def test_elements_that_are_not_objects_are_handed_on_with_a_placeholder():
    body = f'[42, "a ]}}, string", null, [1, {{"a": 2}}], true, {CONNECT}]'
    assert split_messages(body) == [({}, "42"), ({}, '"a ]}, string"'), ({}, "null"), ({}, '[1, {"a": 2}]'),
                                    ({}, "true"), (json.loads(CONNECT), CONNECT)]


def test_escapes_nul_nan_and_garbage_inside_elements():
    surrogate, nul = delivery('{"workitem": {"id": "\\ud800"}}'), delivery('{"n": "a\\u0000b"}')
    nan = delivery('{"n": NaN, "i": Infinity, "m": -Infinity, "big": 1e300}')
    items = split_messages(f"[{surrogate},{nul},{nan},{CONNECT}]")  # all valid for Python's decoder:
    assert [raw for _, raw in items] == [surrogate, nul, nan, CONNECT]  # the normal path, texts exact
    assert items[0][0]["data"]["workitem"]["id"] == "\ud800" and items[1][0]["data"]["n"] == "a\x00b"
    # The lenient path: strings holding brackets, commas and escaped quotes do not end an element;
    # an element that is not JSON is handed on whole; a raw NUL (never JSON) is kept as "\x00".
    tricky = delivery('{"a": "]},[\\"{", "b": "x\\\\"}')
    body = f'[{tricky}, {{"broken": }}, {delivery(chr(0) + "1")},, {{"a":1}} {{"b":2}}, {CONNECT},]'
    assert split_messages(body) == [(json.loads(tricky), tricky), ({}, '{"broken": }'),
                                    ({}, delivery("\\x00" + "1")), ({}, '{"a":1} {"b":2}'),
                                    (json.loads(CONNECT), CONNECT)]


def test_a_huge_message_takes_the_normal_path_and_the_fallback_stays_fast():
    huge = delivery('{"list": [' + ",".join(["0"] * 2_000_000) + "]}")
    for body in (f"[{huge},{CONNECT}]", f"[{huge},{delivery('NaN!')},{CONNECT}]"):  # the second: fallback
        started = time.perf_counter()
        items = split_messages(body)
        assert time.perf_counter() - started < 2.0
        assert [raw for _, raw in items][::len(items) - 1] == [huge, CONNECT]
        assert len(items[0][0]["data"]["list"]) == 2_000_000


@given(st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=4) | json_values, max_size=5),
       st.sampled_from([None, 0, 2]), st.sampled_from([(",", ":"), (", ", ": ")]), st.booleans())
def test_the_fallback_splits_as_the_normal_path(messages, indent, separators, ascii_only):
    text = json.dumps(messages, indent=indent, separators=separators, ensure_ascii=ascii_only)
    expected = [(m if isinstance(m, dict) else {}, raw) for m, raw in _split(text)]
    assert [(m if isinstance(m, dict) else {}, raw) for m, raw in _split_leniently(text)] == expected
    assert split_messages(text) == expected


def test_full_jitter_grows_exponentially_up_to_the_cap():
    rng = random.Random(1)
    for attempt in range(12):
        delays = [full_jitter(attempt, 0.1, 2.0, rng) for _ in range(200)]
        assert 0 <= min(delays) and max(delays) <= min(2.0, 0.1 * 2 ** attempt)
    assert max(full_jitter(1000, 0.1, 2.0, rng) for _ in range(50)) <= 2.0


# -- against the real server -----------------------------------------------------------------------

def test_handshake_subscribe_connect_and_ordered_delivery(cometd):
    async def main():
        recorder = Recorder()
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            async with client_for(cometd, recorder) as client:
                cid = await control.wait_subscribed(client)
                for start in (0, 10, 20):  # broadcasts, spread over several connect replies
                    await control.publish([notification(i) for i in range(start, start + 10)])
                await recorder.wait_for(30)
            traffic = await control.traffic(cid)
            sessions = await control.call("sessions")
        return recorder, client, cid, traffic, sessions

    recorder, client, cid, traffic, sessions = run(main())
    assert recorder.refs() == list(range(30))
    for message, raw in recorder.committed:
        assert json.loads(raw) == message and message["channel"] == CHANNEL
        assert "id" not in message and "clientId" not in message  # broadcasts carry neither
        assert message["data"] == notification(message["data"]["referenceId"])
    assert (client.handshakes, client.messages_received, client.failures) == (1, 30, 0)
    assert client.last_message_at is not None and client.ack_enabled

    handshake, subscribe, *rest = traffic
    [hs] = handshake["messages"]  # alone in its request
    assert hs["version"] == "1.0" and hs["minimumVersion"] == "1.0"
    assert hs["supportedConnectionTypes"] == ["long-polling"] and hs["ext"] == {"ack": True}
    assert handshake["reply"][0]["ext"] == {"ack": True}
    assert [m["subscription"] for m in subscribe["messages"]] == [CHANNEL]
    polls = connects(rest)
    assert all(m["connectionType"] == "long-polling" for e in polls for m in e["messages"])
    assert all(connect_reply(e)["successful"] for e in polls)  # the cookie was kept (IP host)
    for before, after in itertools.pairwise(polls):  # one outstanding connect at a time
        assert after["tIn"] >= before["tEnd"]
    # The ack extension: each connect acknowledges the batch of the previous reply.
    acks = [e["messages"][0]["ext"]["ack"] for e in polls]
    batches = [connect_reply(e)["ext"]["ack"] for e in polls]
    assert acks[0] == -1 and acks[1:] == batches[:-1]
    assert acks == sorted(set(acks))
    assert rest[-1]["messages"][0]["channel"] == "/meta/disconnect"
    assert cid not in {s["id"] for s in sessions}


def test_poison_messages_are_handed_on_with_their_text_and_the_session_goes_on(cometd):
    """Each poison of issue 8, published raw through the double: handed on with its exact text
    (a placeholder message where it is no readable object), acknowledged, in one session."""
    async def main():
        recorder = Recorder()
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            async with client_for(cometd, recorder) as client:
                cid = await control.wait_subscribed(client)
                for count, (_, text, as_message, _) in enumerate(POISON, 1):
                    await control.publish_raw([text], to=cid, as_message=as_message)
                    await recorder.wait_for(count)
                await control.publish([notification(i) for i in range(10)], to=cid)
                await recorder.wait_for(len(POISON) + 10)
            return recorder, client, await control.traffic(cid)

    recorder, client, traffic = run(main())
    assert len(recorder.attempts) == len(POISON) + 1  # each taken at once: no failure, no redelivery
    assert (client.handshakes, client.failures, client.callback_failures) == (1, 0, 0)
    for (name, text, as_message, _), (message, raw) in zip(POISON, recorder.committed[:len(POISON)], strict=True):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "backslashreplace")  # 0xFF kept as the text \xff
        assert raw == (text if as_message else f'{{"channel":"{CHANNEL}","data":{text}}}'), name
        raw.encode("utf-8")  # storable
        assert message == ({} if as_message or name.startswith(("nesting", "not UTF-8")) else json.loads(raw)), name
    assert [m["data"]["referenceId"] for m, _ in recorder.committed[len(POISON):]] == list(range(10))
    acks = [e["messages"][0]["ext"]["ack"] for e in connects(traffic)]
    assert acks == sorted(set(acks))  # every batch acknowledged once


def test_a_body_that_stays_unreadable_is_kept_and_the_session_replaced(cometd):
    """A body broken as a whole (here: "]" as a message ends the array early) cannot be split:
    retried, and with the ack extension the server sends it again; after UNREADABLE_LIMIT in a
    row its text is handed on (for the store to quarantine) and a new session starts."""
    async def main():
        recorder = Recorder()
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            async with client_for(cometd, recorder) as client:
                cid = await control.wait_subscribed(client)
                await control.publish_raw(["]"], to=cid, as_message=True)
                await recorder.wait_for(1)
                second = await control.wait_subscribed(client, not_id=cid)
                await control.publish([notification(1)], to=second)
                await recorder.wait_for(2)
            return recorder, client

    recorder, client = run(main())
    [(message, raw)], [(_, after)] = recorder.committed[:1], recorder.committed[1:]
    assert message == {} and raw.startswith("[],{") and json.loads(after)["data"] == notification(1)
    assert client.handshakes == 2 and client.failures >= UNREADABLE_LIMIT


def test_twenty_clients_each_receive_their_own(cometd):
    async def main():
        recorders = [Recorder() for _ in range(20)]
        clients = [client_for(cometd, r) for r in recorders]
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            for client in clients:
                client.start()
            cids = await asyncio.gather(*(control.wait_subscribed(c) for c in clients))
            for start in (0, 5):
                await asyncio.gather(*(control.publish([notification(i, f"c{n}") for i in range(start, start + 5)],
                                                       to=cid) for n, cid in enumerate(cids)))
            await asyncio.gather(*(r.wait_for(10) for r in recorders))
            await asyncio.gather(*(c.stop() for c in clients))
            traffic = [await control.traffic(cid) for cid in cids]
        return recorders, traffic

    recorders, traffic = run(main())
    for n, recorder in enumerate(recorders):
        assert recorder.refs() == list(range(10))
        assert {m["data"]["workitem"]["id"].split("-")[0] for m, _ in recorder.committed} == {f"c{n}"}
        assert all(set(message) == {"channel", "data"} for message, _ in recorder.committed)  # no id
    for entries in traffic:  # each client kept its own BAYEUX_BROWSER cookie
        assert not any("multiple-clients" in (connect_reply(e).get("advice") or {}) for e in connects(entries))


@pytest.mark.parametrize("how", ["expire", "java-402", "advice-handshake"])
def test_lost_session_means_handshake_again(cometd, how):
    async def main():
        recorder = Recorder()
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            async with client_for(cometd, recorder) as client:
                old = await control.wait_subscribed(client)
                await control.publish([notification(i) for i in range(3)], to=old)
                await recorder.wait_for(3)
                if how == "java-402":
                    await control.call("java-402", {"clientId": old})
                if how == "advice-handshake":
                    await control.call("advice", {"clientId": old, "advice": {"reconnect": "handshake"}})
                else:
                    await control.call("expire", {"clientId": old})
                new = await control.wait_subscribed(client, not_id=old)
                await control.publish([notification(i) for i in range(3, 6)], to=new)
                await recorder.wait_for(6)
            return recorder, client, await control.traffic(old), await control.traffic(new)

    recorder, client, old_traffic, new_traffic = run(main())
    assert recorder.refs() == list(range(6))
    assert client.handshakes == 2 and client.reconnects >= 1
    last = connect_reply(connects(old_traffic)[-1])  # the old session's last word, then no retry
    if how == "advice-handshake":
        assert last["successful"] and last["advice"]["reconnect"] == "handshake"
    elif how == "java-402":  # Java 3.1.9 BayeuxServerImpl.unknownSession: its wording, the same advice
        assert last["error"] == "402::Unknown client" and last["advice"] == {"reconnect": "handshake", "interval": 0}
    else:
        assert last["error"] == "402::session_unknown" and last["advice"] == {"reconnect": "handshake", "interval": 0}
    assert len(new_traffic[0]["messages"]) == 1 and new_traffic[0]["messages"][0]["channel"] == "/meta/handshake"
    assert new_traffic[0]["tIn"] >= connects(old_traffic)[-1]["tEnd"]
    assert new_traffic[1]["messages"][0]["subscription"] == CHANNEL
    assert connects(new_traffic)[0]["messages"][0]["ext"]["ack"] == -1  # a new session, new batches


def test_reconnect_none_stops_the_client(cometd):
    async def main():
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            client = client_for(cometd, Recorder())
            client.start()
            cid = await control.wait_subscribed(client)
            await control.call("advice", {"clientId": cid, "advice": {"reconnect": "none"}})
            with pytest.raises(BayeuxError, match="not to reconnect"):
                await asyncio.wait_for(client.wait(), DEADLINE)
            await client.stop()
            return client, await control.traffic(cid)

    client, traffic = run(main())
    assert isinstance(client.error, BayeuxError) and client.handshakes == 1
    assert connect_reply(connects(traffic)[-1])["advice"]["reconnect"] == "none"
    assert traffic[-1]["messages"][0]["channel"] == "/meta/disconnect"


def test_advice_interval_is_milliseconds_and_the_latest_advice_wins(cometd):
    async def main():
        recorder = Recorder()
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            async with client_for(cometd, recorder) as client:
                cid = await control.wait_subscribed(client)
                ref = 0
                for interval, count in ((600, 3), (50, 4)):
                    await control.call("advice", {"clientId": cid, "advice": {"interval": interval}})
                    for _ in range(count):  # each message wakes a held connect: no waiting for timeouts
                        await control.publish([notification(ref)], to=cid)
                        ref += 1
                        await recorder.wait_for(ref)
            return recorder, await control.traffic(cid)

    recorder, traffic = run(main())
    assert recorder.refs() == list(range(7))
    gaps: dict[int, list[float]] = {600: [], 50: []}
    interval = 0
    for before, after in itertools.pairwise(connects(traffic)):
        interval = (connect_reply(before).get("advice") or {}).get("interval", interval)
        gap = after["tIn"] - before["tEnd"]  # server clock: response written -> next connect read
        assert interval <= gap < interval + 1000, (interval, gap)  # milliseconds, not seconds
        gaps.setdefault(interval, []).append(gap)
    assert len(gaps[600]) >= 3 and len(gaps[50]) >= 3
    assert max(gaps[50]) < 600  # the newer advice replaced the older


def test_failed_callback_means_no_ack_and_redelivery(cometd):
    failed = set()

    def fail_once_on_5(batch):
        if any(m["data"]["referenceId"] == 5 for m, _ in batch) and 5 not in failed:
            failed.add(5)
            return True
        return False

    async def main():
        recorder = Recorder(fail_once_on_5)
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            async with client_for(cometd, recorder) as client:
                cid = await control.wait_subscribed(client)
                await control.publish([notification(i) for i in range(5)], to=cid)
                await recorder.wait_for(5)
                await control.publish([notification(i) for i in range(5, 10)], to=cid)
                await recorder.wait_for(10)
            return recorder, client, await control.traffic(cid)

    recorder, client, traffic = run(main())
    assert recorder.refs() == list(range(10))  # committed exactly once, in order
    assert recorder.refs(recorder.attempts).count(5) == 2 and client.callback_failures == 1
    polls = connects(traffic)
    acks = [e["messages"][0]["ext"]["ack"] for e in polls]
    assert acks == sorted(acks) and len(set(acks)) == len(acks) - 1  # one ack was held back
    held = next(i for i in range(1, len(acks)) if acks[i] == acks[i - 1])
    assert 5 in [m["data"]["referenceId"] for m in events(polls[held - 1])]  # sent, not acked,
    assert 5 in [m["data"]["referenceId"] for m in events(polls[held])]      # so sent again


def test_lost_reply_and_server_restart(node_modules, tmp_path):
    server = NodeServer(node_modules, tmp_path / "server.log").start()
    try:
        async def main():
            recorder = Recorder()
            async with aiohttp.ClientSession() as http:
                control = Control(server, http)
                async with client_for(server, recorder) as client:
                    old = await control.wait_subscribed(client)
                    await control.publish([notification(i) for i in range(5)])
                    await recorder.wait_for(5)
                    # A reply lost on the way: never acknowledged, so sent again.
                    await control.call("drop-next-reply", {"clientId": old})
                    await control.publish([notification(i) for i in range(5, 10)], to=old)
                    await recorder.wait_for(10)
                    before = await control.traffic(old)
                    server.kill()  # a crash: the sessions die with the process
                    await eventually(lambda: asyncio.sleep(0, client.failures > 0), "a failed connect")
                    server.start()  # same port
                    new = await control.wait_subscribed(client, not_id=old)
                    await control.publish([notification(i) for i in range(10, 15)])
                    await recorder.wait_for(15)
                    after = await control.call("log")
            return recorder, client, before, after, old, new

        recorder, client, before, after, old, new = run(main())
    finally:
        server.stop()
    assert recorder.refs() == list(range(15))  # every message committed exactly once, in order
    assert client.handshakes == 2 and client.reconnects >= 2
    polls = connects(before)
    lost = next(i for i, e in enumerate(polls) if e["dropped"])
    assert [m["data"]["referenceId"] for m in events(polls[lost])] == list(range(5, 10))
    resent = polls[lost + 1]
    assert resent["messages"][0]["ext"]["ack"] < connect_reply(polls[lost])["ext"]["ack"]
    assert [m["data"]["referenceId"] for m in events(resent)] == list(range(5, 10))
    # The restarted server: the old session is unknown (402), so handshake alone, subscribe,
    # then connect with the acks of the new session (not the old numbers).
    first_402 = next(i for i, e in enumerate(after) if e["messages"][0].get("clientId") == old)
    assert connect_reply(after[first_402])["error"] == "402::session_unknown"
    handshake = next(e for e in after[first_402:] if e["messages"][0]["channel"] == "/meta/handshake")
    assert len(handshake["messages"]) == 1 and handshake["reply"][0]["clientId"] == new
    assert not any(m.get("clientId") == old for e in after[after.index(handshake):] for m in e["messages"])
    assert next(e for e in connects(after) if e["messages"][0]["clientId"] == new)["messages"][0]["ext"]["ack"] == -1


def test_backoff_on_a_dead_port_is_bounded_and_stops(caplog):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api/v2/notifications"

    async def main():
        started = time.monotonic()
        client = BayeuxClient(url, [CHANNEL], Recorder(), backoff_base=0.01, backoff_cap=0.05,
                              max_failures=5, rng=random.Random(3))
        with pytest.raises(BayeuxError, match="6 failures in a row"):
            async with client:
                await client.wait()
        given_up_after = time.monotonic() - started
        forever = BayeuxClient(url, [CHANNEL], Recorder(), backoff_base=0.01, backoff_cap=0.05)
        forever.start()
        await eventually(lambda: asyncio.sleep(0, forever.failures >= 3), "three failures")
        started = time.monotonic()
        await forever.stop()
        return client, given_up_after, forever, time.monotonic() - started

    with caplog.at_level(logging.WARNING, logger="store.ingest.bayeux"):
        client, given_up_after, forever, stop_took = run(main())
    assert client.failures == 6 and client.handshakes == 0 and given_up_after < 5
    delays = [float(r.getMessage().rsplit(" in ", 1)[1].split()[0]) for r in caplog.records
              if "retry" in r.getMessage()]
    assert delays and max(delays) <= 0.05
    assert forever.error is None and forever._task.done() and stop_took < 1


def test_auth_headers_and_http_error_hooks(caplog):
    """GWS style: Basic auth on every request, a CSRF header the hook fetches after a 403, a 503
    retried after a backoff; an injected HTTP session is used and left open."""
    seen, errors, token, answers = [], [], {}, [web.Response(status=503, text="busy")]
    release = asyncio.Event()

    async def bayeux(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if answers:
            return answers.pop()
        if request.headers.get("X-CSRF-TOKEN") != "t0k3n":
            return web.json_response({"statusCode": 20, "statusMessage": "Missing or invalid Csrf token"}, status=403)
        [message] = await request.json()
        reply = {"channel": message["channel"], "id": message["id"], "successful": True}
        if message["channel"] == "/meta/handshake":
            reply |= {"clientId": "c1", "version": "1.0", "supportedConnectionTypes": ["long-polling"]}
        if message["channel"] == "/meta/connect":
            if message.get("advice") != {"timeout": 0}:
                await release.wait()  # a held long poll, until the client stops
            return web.json_response([{"channel": CHANNEL, "data": notification(0)}, reply])
        return web.json_response([reply])

    async def on_http_error(status, body):
        errors.append((status, body))
        if status == 403:
            token["X-CSRF-TOKEN"] = "t0k3n"  # as a GET /api/v2/me would tell
            return True
        return False

    async def main():
        app = web.Application()
        app.router.add_post("/api/v2/notifications", bayeux)
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api/v2/notifications"
        recorder = Recorder()
        try:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                async with BayeuxClient(url, [CHANNEL], recorder, session=http, auth=("agent", "s3cret"),
                                        headers=lambda: dict(token), on_http_error=on_http_error,
                                        backoff_base=0.01, backoff_cap=0.05) as client:
                    await recorder.wait_for(1)
                assert not http.closed
        finally:
            release.set()
            await runner.cleanup()
        return recorder, client

    with caplog.at_level(logging.DEBUG, logger="store.ingest.bayeux"):
        recorder, client = run(main())
    assert errors[0] == (503, "busy") and errors[1][0] == 403 and len(errors) == 2
    assert json.loads(errors[1][1]) == {"statusCode": 20, "statusMessage": "Missing or invalid Csrf token"}
    assert recorder.refs() == [0] and client.handshakes == 1 and not client.ack_enabled
    assert client.failures == 2
    assert set(seen) == {"Basic YWdlbnQ6czNjcmV0"}  # agent:s3cret, on every request
    assert caplog.records and not any("s3cret" in r.getMessage() or "YWdlbnQ6czNjcmV0" in r.getMessage()
                                      for r in caplog.records)
