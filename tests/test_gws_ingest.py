"""Live ingest (store/ingest/, `workitem-store ingest`) against the CometD test double.

tests/cometd/server.js is the CometD project's Node server made to behave as the Java server
behind GWS: queues per session only (nothing published while no session listens is ever
delivered, unacknowledged messages die with their session), no ids on deliveries, the ack
extension on, off or in Java's object form, and GWS's ``GET /api/v2/me/workitems`` answering each
user's current workitems.  Tests synchronise by polling the database, the control API or the
health endpoint with a deadline, never by sleeping, except where a test must let time pass
(an outage of a given length).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import pytest
from cometd_server import DEADLINE, Control, NodeServer, eventually, notification
from sqlalchemy import func, select

from store.db import open_store
from store.errors import StoreError
from store.ingest.config import SessionConfig, load_config
from store.ingest.service import Ingestor
from store.projections.workitems import CLOSED_STATES
from store.schema import event_log, ingest_gaps, projection_checkpoints, workitems
from store.simulate import Simulator
from store.verify import verify

FAST = {"backoff_base": 0.02, "backoff_cap": 0.2}
PASSWORD = "pw-{}-Geh31m!"  # every test password contains this: it must never show up anywhere


def run(coroutine, limit: float = 120):
    return asyncio.run(asyncio.wait_for(coroutine, limit))


def users(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]  # the server is shared by the session: users of this test only
    return [f"agent{i}-{tag}" for i in range(n)]


def log_rows(engine, kind: str | None = "notification") -> list[dict]:
    c = event_log.c
    query = select(c.seq, c.source, c.session, c.kind, c.payload, c.duplicate_of, c.quarantine_reason).order_by(c.seq)
    if kind is not None:
        query = query.where(c.kind == kind)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def refs_by_source(rows: list[dict]) -> dict[str, list[int]]:
    """referenceIds of the notifications that count (not duplicates), per source, in log order."""
    found = collections.defaultdict(list)
    for row in rows:
        if row["kind"] == "notification" and row["duplicate_of"] is None:
            found[row["source"]].append(json.loads(row["payload"])["data"]["referenceId"])
    return found


def data_by_source(rows: list[dict]) -> dict[str, list[dict]]:
    """The ``data`` of the notifications that count (not duplicates), per source, in log order."""
    found = collections.defaultdict(list)
    for row in rows:
        if row["kind"] == "notification" and row["duplicate_of"] is None:
            found[row["source"]].append(json.loads(row["payload"])["data"])
    return found


def projected_to_head(engine) -> bool:
    with engine.connect() as conn:
        head = conn.execute(select(func.max(event_log.c.seq))).scalar() or 0
        lowest = conn.execute(select(func.min(projection_checkpoints.c.last_seq))).scalar()
    return lowest == head


async def wait_rows(engine, count: int, what: str = "notifications in the log", deadline: float = DEADLINE):
    async def probe():
        rows = await asyncio.to_thread(log_rows, engine)
        return rows if len(rows) >= count else None
    return await eventually(probe, f"{count} {what}", deadline)


async def subscribed(control: Control, names: list[str], deadline: float = DEADLINE,
                     sessions: int = 1) -> dict[str, str]:
    """Each user's (first) live session id, once every one of them has ``sessions`` subscribed (a
    session that has handshaken but whose subscribe is still on its way receives nothing
    published meanwhile)."""
    async def probe():
        state = await control.users()
        live = {u: state.get(u, {}).get("subscribed") or [] for u in names}
        return {u: s[0] for u, s in live.items()} if all(len(s) >= sessions for s in live.values()) else None
    return await eventually(probe, "every session to subscribe", deadline)


def workitem_state(engine, workitem_id: str) -> tuple | None:
    with engine.connect() as conn:
        row = conn.execute(select(workitems.c.state, workitems.c.capabilities)
                           .where(workitems.c.workitem_id == workitem_id)).first()
    return None if row is None else tuple(row)


def metric(text: str, name: str, source: str | None = None) -> float:
    labels = "" if source is None else f'{{source="{source}"}}'
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def assert_no_secret(*texts: str) -> None:
    secret = PASSWORD.format("")[3:]  # the common part of every test password
    for text in texts:
        assert secret not in text


def health(base: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def wait_health(base: str, status: int, what: str, deadline: float = DEADLINE) -> dict:
    async def probe():
        code, body = await asyncio.to_thread(health, base)
        return body if code == status else None
    return await eventually(probe, what, deadline)


class Stream:
    """Workitems of simulated agents changing (store.simulate.Simulator: invited, accepted,
    rejected, transferred, completed), each agent's notifications published to its user through
    the control API, without ids (as real servers send them), ``rate`` per second overall.
    ``published[user]`` lists what was published, with whether a session received it."""

    def __init__(self, control: Control, names: list[str], rate: float, seed: int = 7):
        self.control, self.rate = control, rate
        self.user = {f"agent-{i:03d}": name for i, name in enumerate(names, 1)}
        self.messages = Simulator(agents=len(names), seed=seed, duplicate_rate=0).messages()
        self.published: dict[str, list[tuple[dict, bool]]] = collections.defaultdict(list)
        self.stop = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        started, n = loop.time(), 0
        while not self.stop.is_set():
            source, message = next(self.messages)
            user = self.user[source]
            answer = await self.control.publish([message["data"]], user=user)
            self.published[user].append((message["data"], bool(answer["sessions"])))
            n += 1
            await asyncio.sleep(max(0.0, started + n / self.rate - loop.time()))


async def server_open_workitems(control: Control, names: list[str]) -> dict[str, tuple]:
    lists = await control.workitems()
    return {w["id"]: (w.get("state"), w.get("capabilities")) for name in names for w in lists.get(name, [])}


def store_open_workitems(engine) -> dict[str, tuple]:
    with engine.connect() as conn:
        rows = conn.execute(select(workitems.c.workitem_id, workitems.c.state, workitems.c.capabilities)
                            .where(workitems.c.state.not_in(CLOSED_STATES))).all()
    return {wid: (state, caps) for wid, state, caps in rows}


async def quiet(engine, seconds: float = 1.5, deadline: float = 30) -> int:
    """Wait until no notification arrived for ``seconds``; the count."""
    end, last, since = time.monotonic() + deadline, -1, time.monotonic()
    while True:
        count = len(await asyncio.to_thread(log_rows, engine))
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return count
        assert time.monotonic() < end, "notifications kept arriving"
        await asyncio.sleep(0.1)


# -- many sessions in one process ---------------------------------------------------------------------

def test_many_sessions_record_their_start_snapshot_notifications_and_end(cometd, db_url):
    names = users(10)
    # Half the sessions name their source, half default to the user name.
    configs = [SessionConfig(cometd.base, u, PASSWORD.format(i), f"src-{i}" if i % 2 else None)
               for i, u in enumerate(names)]
    sources = [c.source_name for c in configs]

    async def main():
        engine = open_store(db_url)
        ingestor = Ingestor(engine, configs, metrics_port=0, **FAST)
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            for u in names:  # what each user has open when the sessions start
                await control.set_workitems(u, [{"id": f"open-{u}", "state": "Processing",
                                                 "capabilities": ["Complete"]}])
            task = asyncio.create_task(ingestor.run())
            await subscribed(control, names)
            base = f"http://127.0.0.1:{ingestor.metrics_port}"
            healthy = await wait_health(base, 200, "every session connected")
            for start in (0, 5):
                await asyncio.gather(*(control.publish([notification(r, u) for r in range(start, start + 5)],
                                                       user=u) for u in names))
                await wait_rows(engine, 10 * (start + 5))
            await eventually(lambda: asyncio.to_thread(projected_to_head, engine), "projections to follow")
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 200 and response.content_type == "text/plain"
                metrics = await response.text()
            traffic = await control.call("log")
            ingestor.stop()
            errors = await task
        rows = log_rows(engine, kind=None)
        with engine.connect() as conn:
            items = {w.workitem_id: w for w in conn.execute(select(workitems))}
            gaps = [dict(r._mapping) for r in conn.execute(select(ingest_gaps))]
            assert verify(conn).ok
        engine.dispose()
        return errors, rows, items, gaps, metrics, healthy, traffic

    errors, rows, items, gaps, metrics, healthy, traffic = run(main())
    assert errors == []
    for source in sources:
        mine = [r for r in rows if r["source"] == source]
        session = mine[0]["session"]
        assert {r["session"] for r in mine} == {session} and session.endswith(f"/{source}/1")
        kinds = [r["kind"] if r["kind"] != "session" else json.loads(r["payload"])["event"] for r in mine]
        assert kinds == ["started", "snapshot"] + ["notification"] * 10 + ["ended"]
        assert refs_by_source(mine)[source] == list(range(10))  # each its own, in order, exactly once
    for row in rows:  # the payload is the text received, not a re-serialisation
        if row["kind"] == "notification":
            message = json.loads(row["payload"])
            assert row["payload"] == json.dumps(message, ensure_ascii=False, separators=(",", ":"))
            assert "✓" in row["payload"] and row["quarantine_reason"] is None and "id" not in message
    # The snapshot put what each user had open into the store.
    assert all(items[f"open-{u}"].state == "Processing" and items[f"open-{u}"].notification_count == 0 for u in names)
    assert len(items) == 110
    # The sessions ended cleanly: from then on nobody follows these sources.
    assert sorted(g["source"] for g in gaps) == sorted(sources)
    assert all(g["gap_ended_at"] is None and "stopped" in g["cause"] for g in gaps)
    assert_no_secret(*(r["payload"] for r in rows), json.dumps(healthy), metrics)
    assert healthy["status"] == "ok" and healthy["unhealthy"] == [] and len(healthy["sessions"]) == 10
    assert all(s["state"] == "connected" and s["ack"] for s in healthy["sessions"])
    # Ten sessions, each with its own BAYEUX_BROWSER cookie: never "multiple-clients" advice.
    replies = [m for e in traffic for m in e["reply"] or [] if m.get("channel") == "/meta/connect"]
    assert replies and not any("multiple-clients" in (m.get("advice") or {}) for m in replies
                               if m.get("clientId") in {r["session"] for r in rows})
    for source in sources:
        assert metric(metrics, "workitem_store_notifications_appended_total", source) == 10
        assert metric(metrics, "workitem_store_notifications_stored_total", source) == 10
        assert metric(metrics, "workitem_store_notifications_duplicate_total", source) == 0
        assert metric(metrics, "workitem_store_snapshots_total", source) == 1
        assert metric(metrics, "workitem_store_handshakes_total", source) == 1
        assert metric(metrics, "workitem_store_connected", source) == 1
    assert metric(metrics, "workitem_store_log_writable") == 1
    assert metric(metrics, "workitem_store_spool_bytes") == 0
    assert metric(metrics, "workitem_store_healthy") == 1


# -- losing the session: expiry (402), CSRF, the ack extension's forms, a server restart ------------

def test_lost_sessions_are_recorded_and_healed_by_the_snapshot(node_modules, tmp_path):
    server = NodeServer(node_modules, tmp_path / "server.log").start()
    names = users(3)
    configs = [SessionConfig(server.base, u, PASSWORD.format(i)) for i, u in enumerate(names)]

    async def main():
        engine = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        async with aiohttp.ClientSession() as http:
            control = Control(server, http)
            await control.configure(names[1], ack="object")
            await control.configure(names[2], ack="off", java402=True)
            first_token = (await control.call("csrf", {"enabled": True}))["token"]
            ingestor = Ingestor(engine, configs, **FAST)
            task = asyncio.create_task(ingestor.run())
            ids = await subscribed(control, names)
            for u in names:
                await control.publish([notification(r, u) for r in range(5)], user=u)
            await wait_rows(engine, 15)
            # Expiry: the next connect gets 402; meanwhile w-5 arrives and w-0 is accepted, unseen.
            await control.call("expire", {"clientId": ids[names[0]]})
            await control.publish([notification(5, names[0]),
                                   {**notification(0, names[0]), "workitem": {
                                       **notification(0, names[0])["workitem"], "state": "Processing",
                                       "capabilities": ["Complete"]}}], user=names[0])
            await eventually(lambda: asyncio.sleep(0, ingestor.sessions[0].client.handshakes == 2), "a new session")
            # Its snapshot shows w-0 accepted (and w-5 invited): the projections take both in.
            await eventually(lambda: asyncio.to_thread(lambda: workitem_state(engine, f"{names[0]}-0") == (
                "Processing", ["Complete"]) and workitem_state(engine, f"{names[0]}-5")), "the snapshot to heal")
            # A new CSRF token: requests with the old one get 403; fetch it again and go on.
            second_token = (await control.call("csrf", {"enabled": True}))["token"]
            await subscribed(control, names)
            for u in names:
                await control.publish([notification(r, u) for r in range(10, 13)], user=u)
            await wait_rows(engine, 24)

            async def acknowledged():  # the next connect carries the ack of the last batch
                state = await control.users()
                return state if all({10, 11, 12} <= {d["referenceId"] for data in state[u]["acked"].values()
                                                     for d in data} for u in names[:2]) else None
            state = await eventually(acknowledged, "the acknowledgements")
            acks = [s.client.ack_enabled for s in ingestor.sessions]
            csrf = await control.call("csrf")
            # A crash of the server: every session and queued message is gone with it.
            server.kill()
            await eventually(lambda: asyncio.sleep(0, all(not s.client.connected for s in ingestor.sessions)),
                             "every session to notice")
            server.start()  # same port, CSRF off: GET /api/v2/me answers 404 again
            for u in names:  # the restarted server knows what is open from now on
                await control.set_workitems(u, [{"id": f"{u}-1", "state": "Invited", "capabilities": ["Accept"]}])
            await subscribed(control, names)
            await eventually(lambda: asyncio.to_thread(lambda: sum(
                1 for r in log_rows(engine, "snapshot")) == 7), "the snapshots after the restart")
            ingestor.stop()
            errors = await task
        rows = log_rows(engine, kind=None)
        with engine.connect() as conn:
            items = {w.workitem_id: (w.state, w.capabilities) for w in conn.execute(select(workitems))}
            gaps = [dict(r._mapping) for r in conn.execute(select(ingest_gaps).order_by(ingest_gaps.c.gap_started_at))]
            report = verify(conn)
        engine.dispose()
        return errors, rows, items, gaps, report, ingestor, state, csrf, first_token, second_token, acks

    try:
        errors, rows, items, gaps, report, ingestor, state, csrf, first, second, acks = run(main())
    finally:
        server.stop()
    assert errors == [] and report.ok
    found = refs_by_source(rows)
    assert found[names[0]] == [0, 1, 2, 3, 4, 10, 11, 12]  # 5 was published while no session existed
    assert all(found[u] == [0, 1, 2, 3, 4, 10, 11, 12] for u in names[1:])
    assert all(r["duplicate_of"] is None for r in rows)
    events = [(r["source"], json.loads(r["payload"])["event"]) for r in rows if r["kind"] == "session"]
    assert events.count((names[0], "lost")) == 2 and events.count((names[0], "started")) == 3
    assert all(events.count((u, "started")) == 2 and events.count((u, "lost")) == 1 for u in names[1:])
    causes = [json.loads(r["payload"])["cause"] for r in rows
              if r["kind"] == "session" and json.loads(r["payload"])["event"] == "lost"]
    assert any("402" in c for c in causes)
    # Three gaps of names[0] (expiry, restart, end), two of each other source.
    assert collections.Counter(g["source"] for g in gaps) == {names[0]: 3, names[1]: 2, names[2]: 2}
    assert all(g["snapshot_seq"] is not None for g in gaps if g["gap_ended_at"] is not None)
    # After the restart each store agrees with the server: only what it lists is open.
    for u in names:
        assert items[f"{u}-1"] == ("Invited", ["Accept"])
        assert {w for w, (s, _) in items.items() if w.startswith(u) and s not in CLOSED_STATES} == {f"{u}-1"}
    # Acknowledgements flowed in all three ack forms until the restart.
    for u in names[:2]:
        acked = [d["referenceId"] for cid, data in state[u]["acked"].items() for d in data]
        assert set(acked) >= {10, 11, 12}, u
    assert acks == [True, True, False]
    assert csrf["refused"] >= 3 and csrf["token"] == second != first


def test_a_session_that_cannot_go_on_ends_alone(cometd, tmp_path):
    """A session told not to reconnect ends with its error (recorded as lost); the others go on;
    when every session has ended, run() returns their errors (the command then exits 1)."""
    names = users(2)
    configs = [SessionConfig(cometd.base, u, PASSWORD.format(i)) for i, u in enumerate(names)]

    async def main():
        engine = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        ingestor = Ingestor(engine, configs, **FAST)
        task = asyncio.create_task(ingestor.run())
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            ids = await subscribed(control, names)
            await control.call("advice", {"clientId": ids[names[0]], "advice": {"reconnect": "none"}})
            await eventually(lambda: asyncio.sleep(0, ingestor.sessions[0].client.error), "the first to end")
            await control.publish([notification(r, names[1]) for r in range(3)], user=names[1])
            await wait_rows(engine, 3)
            health_ = ingestor.health()
            await control.call("advice", {"clientId": ids[names[1]], "advice": {"reconnect": "none"}})
            errors = await task
        rows = log_rows(engine, kind=None)
        engine.dispose()
        return errors, rows, health_, ingestor

    errors, rows, health_, ingestor = run(main())
    assert [name for name, _ in errors] == names
    assert all("not to reconnect" in str(exc) for _, exc in errors)
    assert refs_by_source(rows) == {names[1]: [0, 1, 2]}
    assert health_["status"] == "unhealthy"
    assert [u["component"] for u in health_["unhealthy"]] == [f"session {names[0]}"]
    lost = [json.loads(r["payload"]) for r in rows if r["kind"] == "session"
            and json.loads(r["payload"])["event"] == "lost"]
    assert len(lost) == 2 and all("not to reconnect" in m["cause"] for m in lost)
    assert not ingestor.stopped_by_request


# -- the command: kill -9 and restart, two ingestors, SIGTERM, credentials ---------------------------

def _start_ingest(args: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as stderr:
        return subprocess.Popen([sys.executable, "-m", "store", "ingest", *args],
                                env=env, stdout=subprocess.PIPE, stderr=stderr)


def _metrics_url(log_path: Path, after: int = 0) -> str:
    """The /metrics address the ingestor logged (it was given --metrics-port 0)."""
    end = time.monotonic() + DEADLINE
    while True:
        text = log_path.read_text(encoding="utf-8", errors="replace")[after:]
        match = re.search(r"metrics on (http://127\.0\.0\.1:\d+)/metrics", text)
        if match:
            return match.group(1)
        assert time.monotonic() < end, f"no metrics address in {log_path}:\n{text}"
        time.sleep(0.02)


def _config(path: Path, base: str, names: list[str]) -> tuple[Path, dict]:
    path.write_text(f'gws_url = "{base}"\n' + "".join(
        f'[[sessions]]\nuser = "{u}"\npassword_env = "PW_{i}"\n' for i, u in enumerate(names)), encoding="utf-8")
    return path, {**os.environ, **{f"PW_{i}": PASSWORD.format(i) for i in range(len(names))}}


class Ingest:
    """`workitem-store ingest` in a child process, with its log file and health endpoint."""

    def __init__(self, args: list[str], env: dict, log_path: Path):
        self.args, self.env, self.log_path = args, env, log_path
        self.process: subprocess.Popen | None = None
        self.base = ""

    async def start(self) -> Ingest:
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = _start_ingest(self.args, self.env, self.log_path)
        self.base = await asyncio.to_thread(_metrics_url, self.log_path, size)
        return self

    def kill(self) -> None:
        self.process.kill()  # kill -9: no disconnect, no final anything
        self.process.wait(5)

    async def terminate(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(self.process.communicate, timeout=60)
        return out.decode()

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def test_kill_9_and_a_restart_20_s_later_heal_what_was_missed(cometd, db_url, tmp_path):
    """20 agents' workitems change all along; the ingestor is killed and restarted 20 s later.
    Afterwards the store shows exactly the server's open workitems, closes what closed meanwhile,
    lists the gap of every source, and verifies."""
    names = users(20)
    config, env = _config(tmp_path / "agents.toml", cometd.base, names)
    ingest = Ingest(["--config", str(config), "--db", db_url, "--metrics-port", "0"], env, tmp_path / "ingest.log")

    async def main():
        engine = open_store(db_url)
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            stream = Stream(control, names, rate=60)
            try:
                await ingest.start()
                await wait_health(ingest.base, 200, "every session connected")
                cmdline = Path(f"/proc/{ingest.process.pid}/cmdline").read_bytes().decode()
                publisher = asyncio.create_task(stream.run())
                await wait_rows(engine, 200, deadline=30)
                killed_at = dt.datetime.now(dt.UTC)
                ingest.kill()
                await asyncio.sleep(20)  # the workitems go on changing while nobody listens
                restarted_at = dt.datetime.now(dt.UTC)
                await ingest.start()
                await wait_health(ingest.base, 200, "every session connected again")
                await asyncio.sleep(3)  # and some more changes, seen live
                stream.stop.set()
                await publisher
                await quiet(engine)
                out = await ingest.terminate()
            finally:
                ingest.cleanup()
            server = await server_open_workitems(control, names)
        store = store_open_workitems(engine)
        with engine.connect() as conn:
            ended = select(ingest_gaps).where(ingest_gaps.c.gap_ended_at.is_not(None))
            gaps = [dict(r._mapping) for r in conn.execute(ended)]
            report = verify(conn)
        rows = log_rows(engine, kind=None)
        engine.dispose()
        return server, store, gaps, report, killed_at, restarted_at, out, cmdline, rows, stream

    server, store, gaps, report, killed_at, restarted_at, out, cmdline, rows, stream = run(main(), 180)
    assert ingest.process.returncode == 0, out
    assert report.ok, (report.chain_break, report.differences)
    missed = sum(1 for items in stream.published.values() for _, got in items if not got)
    assert missed > 100  # the server delivered those to nobody: only the snapshots could heal them
    assert server and store == server  # every open workitem as the server has it; nothing else open
    assert sorted(g["source"] for g in gaps) == sorted(names)
    for g in gaps:  # the gap covers the time nobody listened, and a snapshot healed it
        assert g["gap_started_at"] <= killed_at + dt.timedelta(seconds=1)
        assert g["gap_ended_at"] >= restarted_at and g["snapshot_seq"] is not None
        assert "killed or crashed" in g["cause"]
    assert_no_secret(cmdline, ingest.log_path.read_text(encoding="utf-8"), out, *(r["payload"] for r in rows))
    assert "Authorization" not in ingest.log_path.read_text(encoding="utf-8")


def test_two_ingestors_store_each_notification_once_and_survive_a_kill(cometd, db_url, tmp_path):
    """Two ingest processes follow the same agents (no ids on the wire): each notification is
    projected once; after kill -9 of one, the other still stores everything."""
    names = users(4)
    config, env = _config(tmp_path / "agents.toml", cometd.base, names)
    first = Ingest(["--config", str(config), "--db", db_url, "--metrics-port", "0"], env, tmp_path / "first.log")
    second = Ingest(["--config", str(config), "--db", db_url, "--metrics-port", "0"], env, tmp_path / "second.log")
    published: dict[str, list[int]] = collections.defaultdict(list)

    async def publish(control, refs):
        for ref in refs:
            for u in names:
                # Every fifth notification has the same text as the one before it: a second,
                # real notification that only its time tells apart.
                data = notification(ref - 1 if ref % 5 == 0 else ref, u)
                await control.publish([data], user=u)
                published[u].append(data["referenceId"])
            await asyncio.sleep(0.02)

    async def main():
        engine = open_store(db_url)
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            try:
                await first.start()
                await second.start()
                await wait_health(first.base, 200, "the first ingestor connected")
                await wait_health(second.base, 200, "the second ingestor connected")
                await subscribed(control, names, sessions=2)  # (both: connected is not yet subscribed)
                await publish(control, range(1, 31))
                await wait_rows(engine, 4 * 30)
                first.kill()
                await publish(control, range(31, 61))
                await wait_rows(engine, 4 * 60)
                await quiet(engine)
                out = await second.terminate()
            finally:
                first.cleanup()
                second.cleanup()
        rows = log_rows(engine)
        runner_rows = []
        with engine.connect() as conn:
            report = verify(conn)
            counts = dict(conn.execute(select(workitems.c.workitem_id, workitems.c.notification_count)).all())
        engine.dispose()
        return rows, report, counts, out, runner_rows

    rows, report, counts, out, _ = run(main(), 120)
    assert second.process.returncode == 0, out
    assert report.ok
    found = refs_by_source(rows)
    for u in names:
        assert found[u] == published[u], u  # each notification once, in order, the repeated ones too
    kept = [r for r in rows if r["duplicate_of"] is None]
    copies = [r for r in rows if r["duplicate_of"] is not None]
    assert len(kept) == 4 * 60 and len(copies) >= 4 * 25  # both followed until the kill
    by_seq = {r["seq"]: r for r in rows}
    assert all(by_seq[r["duplicate_of"]]["session"] != r["session"] for r in copies)  # the other one's copy
    # Projected once: each workitem's notification_count is its number of notifications.
    expected = collections.Counter(f"{u}-{ref}" for u in names for ref in published[u])
    assert counts == dict(expected)


def test_sigterm_project_follow_and_credentials(cometd, tmp_path):
    [user] = users(1)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    env = {**os.environ, "GWS_PW": PASSWORD.format(0)}
    log_path = tmp_path / "ingest.log"

    async def main():
        engine = open_store(db)
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            ingest = _start_ingest(["--gws-url", cometd.base, "--user", user, "--password-env", "GWS_PW",
                                    "--source", "desk-7", "--no-project", "--notifications-path", "/cometd",
                                    "--db", db], env, log_path)
            follow = subprocess.Popen([sys.executable, "-m", "store", "project", "--follow",
                                       "--interval-ms", "50", "--db", db],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                await subscribed(control, [user])
                await control.publish([notification(r, user) for r in range(7)], user=user)
                await wait_rows(engine, 7)
                await eventually(lambda: asyncio.to_thread(projected_to_head, engine), "project --follow")
                ingest.send_signal(signal.SIGTERM)
                ingest_out, _ = await asyncio.to_thread(ingest.communicate, timeout=DEADLINE)
                await eventually(lambda: asyncio.to_thread(projected_to_head, engine), "the ended marker")
                follow.send_signal(signal.SIGINT)
                follow_out, follow_err = await asyncio.to_thread(follow.communicate, timeout=DEADLINE)
            finally:
                for p in (ingest, follow):
                    if p.poll() is None:
                        p.kill()
            state = await control.users()
            traffic = await control.call("log")
        rows = log_rows(engine, kind=None)
        engine.dispose()
        return ingest, follow, ingest_out.decode(), follow_out.decode(), follow_err.decode(), rows, state, traffic

    ingest, follow, ingest_out, follow_out, follow_err, rows, state, traffic = run(main())
    assert ingest.returncode == 0, ingest_out
    assert follow.returncode == 0, follow_err
    assert refs_by_source(rows) == {"desk-7": list(range(7))}
    assert "desk-7: 7 received, 7 stored, 7 appended" in ingest_out and "projections up to date" not in ingest_out
    assert "applied" in follow_out and "stopped; projections at seq 10" in follow_out
    assert state[user]["sessions"] == []  # disconnected cleanly on SIGTERM
    assert [json.loads(r["payload"])["event"] for r in rows if r["kind"] == "session"] == ["started", "ended"]
    mine = [e for e in traffic if e["user"] == user]
    assert mine and all(e["path"] == "/cometd" for e in mine)
    assert_no_secret(log_path.read_text(encoding="utf-8"), ingest_out, *(r["payload"] for r in rows))


# -- the database in trouble: no session lost, nothing lost ----------------------------------------------

@contextlib.asynccontextmanager
async def sqlite_locked(path: Path, seconds: float):
    """Another process's writer holding the SQLite file's write lock for ``seconds`` (waited for
    in a thread: the event loop, and so every session, goes on meanwhile)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        f"time.sleep({seconds})\n"
        "c.execute('ROLLBACK')\n")], stdout=subprocess.PIPE)
    try:
        assert (await asyncio.to_thread(holder.stdout.readline)).strip() == b"locked"
        yield holder
    finally:
        await asyncio.to_thread(holder.wait, seconds + 30)


async def through_an_outage(server: NodeServer, engine, trouble, **options) -> dict:
    """20 sessions receive a stream of notifications while ``trouble()`` (an async context
    manager) makes the database unwritable for a while; what the checks of ``check_outage``
    need."""
    names = users(20)
    configs = [SessionConfig(server.base, u, PASSWORD.format(i)) for i, u in enumerate(names)]
    ingestor = Ingestor(engine, configs, metrics_port=0, **FAST, **options)
    task = asyncio.create_task(ingestor.run())
    async with aiohttp.ClientSession() as http:
        control = Control(server, http)
        await subscribed(control, names)
        base = f"http://127.0.0.1:{ingestor.metrics_port}"
        await wait_health(base, 200, "healthy")
        stream = Stream(control, names, rate=100)
        publisher = asyncio.create_task(stream.run())
        await wait_rows(engine, 50)
        async with trouble():
            broken_at = time.monotonic()
            unhealthy = await wait_health(base, 503, "503 while the database cannot be written", deadline=5)
            seen_within = time.monotonic() - broken_at
            await asyncio.sleep(20)
            during = ingestor.health()
        await wait_health(base, 200, "200 once the database is back", deadline=60)
        stream.stop.set()
        await publisher
        await quiet(engine)
        ingestor.stop()
        errors = await task
    with engine.connect() as conn:
        report = verify(conn)
    return {"errors": errors, "rows": log_rows(engine), "report": report, "ingestor": ingestor, "stream": stream,
            "unhealthy": unhealthy, "seen_within": seen_within, "during": during}


def check_outage(outcome: dict, at_least: int) -> None:
    """No session was lost, everything delivered is stored, in order, and health told the truth."""
    assert outcome["errors"] == [] and outcome["report"].ok
    assert outcome["seen_within"] < 5
    assert [u["component"] for u in outcome["unhealthy"]["unhealthy"]] == ["log"]
    during = outcome["during"]
    assert during["log"]["spooling"] and during["spool"]["bytes"] > 0 and during["spool"]["oldest_age_seconds"] > 15
    assert all(s.client.handshakes == 1 for s in outcome["ingestor"].sessions)  # no session was lost
    found = data_by_source(outcome["rows"])
    for user, items in outcome["stream"].published.items():  # everything delivered, in order
        assert found.get(user, []) == [d for d, got in items if got], user
    assert sum(len(v) for v in found.values()) > at_least


def test_a_locked_sqlite_store_costs_no_session_and_nothing(node_modules, tmp_path):
    """Another writer holds the SQLite store for 30 s; the server drops a session that sends no
    connect for 5 s (maxInterval): batches are spooled and acknowledged, no session is lost,
    and everything reaches the log in order once the lock is gone."""
    server = NodeServer(node_modules, tmp_path / "server.log", max_interval=5000).start()
    path = tmp_path / "store.db"
    engine = open_store(f"sqlite:///{path}")
    try:
        outcome = run(through_an_outage(server, engine, lambda: sqlite_locked(path, 30), spool_after=1.0), 180)
    finally:
        server.stop()
        engine.dispose()
    check_outage(outcome, 3000)


@pytest.mark.postgres
def test_postgresql_down_for_60_s_costs_no_session_and_nothing(node_modules, tmp_path):
    """A PostgreSQL store (a private server: the shared one is never stopped) is down for 60 s
    while 20 sessions receive: no session is re-handshaken, nothing is lost, and everything
    reaches the log in order once it is back."""
    from pg_instance import PrivatePostgres

    @contextlib.asynccontextmanager
    async def down_for_60_s():
        await asyncio.to_thread(pg.stop)
        stopped_at = time.monotonic()
        yield
        await asyncio.sleep(60 - (time.monotonic() - stopped_at))
        await asyncio.to_thread(pg.start)

    server = NodeServer(node_modules, tmp_path / "server.log").start()
    try:
        with PrivatePostgres() as pg:
            pg.start()
            engine = open_store(pg.create_database("outage"))
            outcome = run(through_an_outage(server, engine, down_for_60_s, spool_dir=tmp_path / "spool"), 240)
            engine.dispose()
    finally:
        server.stop()
    check_outage(outcome, 6000)


# -- health that tells the truth ------------------------------------------------------------------------

def test_health_follows_the_sessions_within_5_s(node_modules, tmp_path):
    server = NodeServer(node_modules, tmp_path / "server.log").start()
    names = users(2)
    configs = [SessionConfig(server.base, u, PASSWORD.format(i)) for i, u in enumerate(names)]

    async def main():
        engine = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        ingestor = Ingestor(engine, configs, metrics_port=0, **FAST)
        task = asyncio.create_task(ingestor.run())
        base = ""
        async with aiohttp.ClientSession() as http:
            control = Control(server, http)
            await subscribed(control, names)
            base = f"http://127.0.0.1:{ingestor.metrics_port}"
            await wait_health(base, 200, "healthy")
            server.kill()
            lost_at = time.monotonic()
            unhealthy = await wait_health(base, 503, "503 once the sessions lost their server", deadline=5)
            seen_within = time.monotonic() - lost_at
            server.start()
            healthy = await wait_health(base, 200, "200 after recovery")
            ingestor.stop()
            await task
        engine.dispose()
        return unhealthy, seen_within, healthy

    try:
        unhealthy, seen_within, healthy = run(main())
    finally:
        server.stop()
    assert seen_within < 5
    assert {u["component"] for u in unhealthy["unhealthy"]} == {f"session {u}" for u in names}
    assert all(u["since"].endswith("Z") and u["reason"] for u in unhealthy["unhealthy"])
    assert healthy["unhealthy"] == [] and all(s["handshakes"] == 2 for s in healthy["sessions"])


# -- real deployments: https with a private CA, proxies ---------------------------------------------------

@pytest.fixture
def tls_server(node_modules, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    ca.cert_pem.write_to_path(ca_file)
    server = NodeServer(node_modules, tmp_path / "server.log", tls=(cert, key)).start()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    yield server, ca_file, context
    server.stop()


def test_https_with_a_private_ca_and_without_it(tls_server, tmp_path):
    server, ca_file, context = tls_server
    [user] = users(1)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    env = {**os.environ, "GWS_PW": PASSWORD.format(0)}
    args = ["--gws-url", server.base, "--user", user, "--password-env", "GWS_PW", "--db", db]

    started = time.monotonic()
    refused = subprocess.run([sys.executable, "-m", "store", "ingest", *args, "--metrics-port", "0"],
                             env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert refused.returncode == 1 and took < 30
    assert "certificate verify failed" in refused.stderr and "--ca-file" in refused.stderr, refused.stderr

    async def main():
        engine = open_store(db)
        ingest = Ingest([*args, "--ca-file", str(ca_file), "--metrics-port", "0"], env, tmp_path / "ingest.log")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
            control = Control(server, http)
            try:
                await ingest.start()
                await wait_health(ingest.base, 200, "connected over https")
                await control.publish([notification(r, user) for r in range(3)], user=user)
                await wait_rows(engine, 3)
                out = await ingest.terminate()
            finally:
                ingest.cleanup()
        rows = log_rows(engine)
        engine.dispose()
        return out, rows

    out, rows = run(main())
    assert refs_by_source(rows) == {user: [0, 1, 2]}


def test_a_certificate_error_makes_health_503_at_once(tls_server, cometd, tmp_path):
    server, _, _ = tls_server
    bad, good = users(2)

    async def main():
        engine = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        ingestor = Ingestor(engine, [SessionConfig(server.base, bad, "pw"), SessionConfig(cometd.base, good, "pw")],
                            metrics_port=0, **FAST)
        task = asyncio.create_task(ingestor.run())
        await eventually(lambda: ingestor.metrics_port, "the health endpoint")
        base = f"http://127.0.0.1:{ingestor.metrics_port}"
        started = time.monotonic()
        await eventually(lambda: asyncio.sleep(0, ingestor.sessions[0].client.error), "the session to stop")
        took = time.monotonic() - started

        async def only_the_bad_one():  # the other session connected, this one stopped
            code, body = await asyncio.to_thread(health, base)
            return body if code == 503 and [u["component"] for u in body["unhealthy"]] == [f"session {bad}"] else None
        body = await eventually(only_the_bad_one, "503 for the session that stopped")
        ingestor.stop()
        errors = await task
        engine.dispose()
        return body, took, errors, ingestor

    body, took, errors, ingestor = run(main())
    assert took < 5 and len(errors) == 1 and "certificate verify failed" in str(errors[0][1])
    assert ingestor.sessions[0].client.failures == 0  # never retried
    [unhealthy] = body["unhealthy"]
    assert unhealthy["component"] == f"session {bad}" and "certificate verify failed" in unhealthy["reason"]


@pytest.mark.parametrize("how", ["HTTPS_PROXY", "--proxy"])
def test_through_a_proxy(tls_server, tmp_path, monkeypatch, how):
    """https through an HTTP proxy (CONNECT): from the environment (HTTPS_PROXY, unless NO_PROXY
    names the host) or from the proxy option; the proxy must see the GWS host."""
    from http_proxy import HttpProxy

    server, ca_file, context = tls_server
    [user] = users(1)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def main(proxy):
        option = None
        if how == "HTTPS_PROXY":
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            monkeypatch.setenv("NO_PROXY", "gws.elsewhere.example")
        else:
            option = proxy.url
        engine = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        ingestor = Ingestor(engine, [SessionConfig(server.base, user, "pw", ca_file=str(ca_file), proxy=option)],
                            **FAST)
        task = asyncio.create_task(ingestor.run())
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
            control = Control(server, http)  # (the test's own requests: not through the proxy)
            await subscribed(control, [user])
            await control.publish([notification(r, user) for r in range(3)], user=user)
            await wait_rows(engine, 3)
            ingestor.stop()
            errors = await task
        rows = log_rows(engine)
        engine.dispose()
        return errors, rows

    with HttpProxy() as proxy:
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the fixtures' own requests go direct
        errors, rows = run(main(proxy))
        proxy.wait_for_target(f"127.0.0.1:{server.port}")
    assert errors == [] and refs_by_source(rows) == {user: [0, 1, 2]}


# -- configuration -------------------------------------------------------------------------------------

def test_config_file_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("A_PW", "secret-a")
    path = tmp_path / "c.toml"

    def load(text: str, **kw):
        path.write_text(text, encoding="utf-8")
        return load_config(path, **kw)

    [a, b] = load('gws_url = "http://gws:8080"\nproxy = "http://proxy:3128"\n'
                  '[[sessions]]\nuser = "a"\npassword_env = "A_PW"\n'
                  '[[sessions]]\nuser = "b"\npassword = "plain"\nsource = "bee"\ngws_url = "http://other"\n'
                  'notifications_path = "/cometd"\nproxy = "http://other-proxy:3128"\n')
    assert (a.user, a.password, a.source_name, a.notifications_url, a.proxy) == (
        "a", "secret-a", "a", "http://gws:8080/api/v2/notifications", "http://proxy:3128")
    assert (b.source_name, b.gws_url, b.notifications_url, b.proxy) == (
        "bee", "http://other", "http://other/cometd", "http://other-proxy:3128")
    assert "secret-a" not in repr(a) and "plain" not in repr(b) and "proxy" not in repr(a).split("user")[0]
    [c] = load('[[sessions]]\nuser = "c"\npassword_env = "A_PW"\n', gws_url="http://from-option",
               ca_file="/from/option.pem")
    assert (c.gws_url, c.ca_file) == ("http://from-option", "/from/option.pem")
    for text, error in [
        ('gws_url = "x"\n[[sessions]]\nuser = "a"\npassword_env = "NOPE_PW"\n', "NOPE_PW is not set"),
        ('gws_url = "x"\n[[sessions]]\nuser = "a"\n', "exactly one of password_env or password"),
        ('gws_url = "x"\n[[sessions]]\nuser = "a"\npassword = "p"\npassword_env = "A_PW"\n', "exactly one"),
        ('[[sessions]]\nuser = "a"\npassword = "p"\n', "gws_url is missing"),
        (('gws_url = "x"\n[[sessions]]\nuser = "a"\npassword = "p"\n'
          '[[sessions]]\nuser = "b"\npassword = "p"\nsource = "a"\n'), "source given to several sessions: a"),
        ('gws_url = "x"\n', "no [[sessions]]"),
        ('gws_url = "x"\n[[sessions]]\nuser = "a"\npasword = "p"\n', "unknown keys pasword"),
        ('gws_url = "x"\ncafile = "y"\n[[sessions]]\nuser = "a"\npassword = "p"\n', "unknown top-level keys cafile"),
        ('gws_url = "x"\n[[sessions]]\nuser = "a"\npassword = "p"\nproxy = 3\n', "proxy must be a non-empty string"),
        ("gws_url = \n", "not TOML"),
    ]:
        with pytest.raises(StoreError, match=re.escape(error)):
            load(text)


def test_tls_files_that_cannot_be_used_are_named(tmp_path):
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("hello\n")
    with pytest.raises(StoreError, match=f"CA file {re.escape(str(bad))}"):
        SessionConfig("https://gws", "u", "p", ca_file=str(bad)).ssl_context()
    with pytest.raises(StoreError, match="cannot use the CA file .*missing.pem: No such file"):
        SessionConfig("https://gws", "u", "p", ca_file=str(tmp_path / "missing.pem")).ssl_context()
    with pytest.raises(StoreError, match=f"client certificate {re.escape(str(bad))}"):
        SessionConfig("https://gws", "u", "p", client_cert=str(bad)).ssl_context()
    with pytest.raises(StoreError, match="needs a client certificate"):
        SessionConfig("https://gws", "u", "p", client_key=str(bad)).ssl_context()


def test_ingest_usage_errors(tmp_path):
    from click.testing import CliRunner

    from store.cli import main

    runner = CliRunner()
    db = str(tmp_path / "s.db")
    result = runner.invoke(main, ["ingest", "--db", db])
    assert result.exit_code == 2 and "--gws-url, --user and --password-env" in result.output
    result = runner.invoke(main, ["ingest", "--gws-url", "http://x", "--user", "u", "--password-env",
                                  "SURELY_UNSET_PW_VAR", "--db", db])
    assert result.exit_code == 1 and "SURELY_UNSET_PW_VAR is not set" in result.output
    result = runner.invoke(main, ["ingest", "--config", str(tmp_path / "c.toml"), "--user", "u", "--db", db])
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(main, ["ingest", "--spool-max", "lots", "--db", db])
    assert result.exit_code == 2 and "not a size" in result.output
    result = runner.invoke(main, ["ingest", "--gws-url", "https://x", "--user", "u", "--password-env", "PATH",
                                  "--ca-file", str(tmp_path / "none.pem"), "--db", db])
    assert result.exit_code == 1 and "cannot use the CA file" in result.output
