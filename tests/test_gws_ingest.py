"""Live ingest (store/ingest/gws.py, `workitem-store ingest`) against the real CometD server for Node.

tests/cometd/server.js keeps notifications per user (the HTTP Basic login of a session's
handshake) until a session of that user acknowledges them (ack extension), so a new session,
e.g. of an ingestor restarted after `kill -9`, gets everything no session acknowledged; its
control API also says what was acknowledged, and can switch CSRF on.  Tests synchronise by
polling the database, the control API or the metrics endpoint with a deadline, never by sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import pytest
from cometd_server import DEADLINE, Control, NodeServer, eventually, notification
from sqlalchemy import func, select

from store.db import StoreError, open_store, snapshot
from store.ingest.gws import Ingestor, SessionConfig, load_config
from store.schema import event_log, projection_checkpoints, workitems
from store.verify import verify

FAST = {"backoff_base": 0.02, "backoff_cap": 0.2}
PASSWORD = "pw-{}-Geh31m!"  # every test password contains this: it must never show up anywhere


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def users(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]  # the server is shared by the session: users of this test only
    return [f"agent{i}-{tag}" for i in range(n)]


def log_rows(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            select(event_log.c.seq, event_log.c.source, event_log.c.payload, event_log.c.quarantine_reason)
            .order_by(event_log.c.seq))]


def refs_by_source(rows: list[dict]) -> dict[str, list[int]]:
    found = collections.defaultdict(list)
    for row in rows:
        found[row["source"]].append(json.loads(row["payload"])["data"]["referenceId"])
    return found


def projected_to_head(engine) -> bool:
    with engine.connect() as conn:
        head = conn.execute(select(func.max(event_log.c.seq))).scalar() or 0
        lowest = conn.execute(select(func.min(projection_checkpoints.c.last_seq))).scalar()
    return lowest == head


async def wait_rows(engine, count: int, what: str = "rows in the log") -> list[dict]:
    async def probe():
        rows = await asyncio.to_thread(log_rows, engine)
        return rows if len(rows) >= count else None
    return await eventually(probe, f"{count} {what}")


def metric(text: str, name: str, source: str | None = None) -> float:
    labels = "" if source is None else f'{{source="{source}"}}'
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def assert_no_secret(*texts: str) -> None:
    secret = PASSWORD.format("")[3:]  # the common part of every test password
    for text in texts:
        assert secret not in text


# -- many sessions in one process -----------------------------------------------------------------

def test_many_sessions_each_get_their_own_into_the_log(cometd, db_url):
    names = users(10)
    # Half the sessions name their source, half default to the user name.
    configs = [SessionConfig(cometd.base, u, PASSWORD.format(i), f"src-{i}" if i % 2 else None)
               for i, u in enumerate(names)]
    sources = [c.source_name for c in configs]

    async def main():
        engine = open_store(db_url)
        ingestor = Ingestor(engine, configs, metrics_port=0, **FAST)
        task = asyncio.create_task(ingestor.run())
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            for start in (0, 5):  # before and after the sessions subscribed: both arrive
                await asyncio.gather(*(control.publish([notification(r, u) for r in range(start, start + 5)],
                                                       user=u) for u in names))
                await wait_rows(engine, 10 * (start + 5))
            # Projections follow by themselves, within about a second.
            await eventually(lambda: asyncio.to_thread(projected_to_head, engine), "projections to follow")
            base = f"http://127.0.0.1:{ingestor.metrics_port}"
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 200 and response.content_type == "text/plain"
                metrics = await response.text()
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 200
                health = await response.json()
            running = await control.call("users")
            traffic = await control.call("log")
            ingestor.stop()
            errors = await task
            state = await control.call("users")
        with engine.connect() as conn:
            items = conn.execute(select(func.count()).select_from(workitems)).scalar()
        rows = log_rows(engine)
        engine.dispose()
        return errors, rows, items, metrics, health, running, state, traffic, ingestor

    errors, rows, items, metrics, health, running, state, traffic, ingestor = run(main())
    assert errors == [] and len(rows) == 100 and items == 100
    found = refs_by_source(rows)
    assert set(found) == set(sources)
    for user, source in zip(names, sources):
        assert found[source] == list(range(10))  # each its own, in order, exactly once
        assert all(json.loads(r["payload"])["data"]["workitem"]["id"].startswith(user)
                   for r in rows if r["source"] == source)
        assert len(state[user]["acked"]) == 10 and state[user]["pending"] == []
    for row in rows:  # the payload is the text received, not a re-serialisation
        message = json.loads(row["payload"])
        assert row["payload"] == json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        assert "✓" in row["payload"] and row["quarantine_reason"] is None
    assert_no_secret(*(r["payload"] for r in rows), json.dumps(health), metrics)
    # Ten sessions, each with its own BAYEUX_BROWSER cookie (never "multiple-clients" advice),
    # all disconnected at the end.
    ids = {u: running[u]["sessions"] for u in names}
    assert all(len(v) == 1 for v in ids.values()) and len({v[0] for v in ids.values()}) == 10
    ours = {v[0] for v in ids.values()}
    replies = [m for e in traffic if any(m.get("clientId") in ours for m in e["messages"])
               for m in e["reply"] or [] if m.get("channel") == "/meta/connect"]
    assert replies and not any("multiple-clients" in (m.get("advice") or {}) for m in replies)
    assert all(state[u]["sessions"] == [] for u in names)
    # The metrics endpoint: per-source counters and the gauges.
    for source in sources:
        assert metric(metrics, "workitem_store_notifications_appended_total", source) == 10
        assert metric(metrics, "workitem_store_notifications_received_total", source) == 10
        assert metric(metrics, "workitem_store_notifications_duplicate_total", source) == 0
        assert metric(metrics, "workitem_store_notifications_quarantined_total", source) == 0
        assert metric(metrics, "workitem_store_handshakes_total", source) == 1
        assert metric(metrics, "workitem_store_reconnects_total", source) == 0
        assert 0 <= metric(metrics, "workitem_store_last_message_age_seconds", source) < DEADLINE
    assert metric(metrics, "workitem_store_projection_lag_rows") == 0
    assert metric(metrics, "workitem_store_log_head_seq") == 100
    assert "# TYPE workitem_store_notifications_appended_total counter" in metrics
    assert health["status"] == "running" and len(health["sessions"]) == 10
    assert health["log_head_seq"] == 100 and health["projection_lag_rows"] == 0
    assert ingestor.projections_run >= 1


# -- losing the session: expiry (402), CSRF, a server restart ----------------------------------------

def test_402_csrf_and_server_restart_lose_nothing(node_modules, tmp_path):
    server = NodeServer(node_modules, tmp_path / "server.log").start()
    names = users(3)
    configs = [SessionConfig(server.base, u, PASSWORD.format(i)) for i, u in enumerate(names)]
    published = collections.defaultdict(list)

    async def publish(control, user, refs):
        await control.publish([notification(r, user) for r in refs], user=user)
        published[user].extend(refs)

    async def all_in(engine, control):
        rows = await wait_rows(engine, sum(map(len, published.values())))

        async def acknowledged():  # the server was told: nothing will be sent again
            state = await control.call("users")
            return all(state[u]["pending"] == [] for u in names)
        await eventually(acknowledged, "acknowledgements")
        return rows

    async def main():
        engine = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        async with aiohttp.ClientSession() as http:
            control = Control(server, http)
            first_token = (await control.call("csrf", {"enabled": True}))["token"]
            ingestor = Ingestor(engine, configs, **FAST)
            task = asyncio.create_task(ingestor.run())
            for u in names:
                await publish(control, u, range(5))
            await all_in(engine, control)
            # Expiry: the next connect gets 402::session_unknown; handshake again, lose nothing.
            victim = (await control.call("users"))[names[0]]["sessions"][0]
            await control.call("expire", {"clientId": victim})
            for u in names:
                await publish(control, u, range(5, 10))
            await all_in(engine, control)
            # A new CSRF token: requests with the old one get 403; fetch it again and go on.
            second_token = (await control.call("csrf", {"enabled": True}))["token"]
            for u in names:
                await publish(control, u, range(10, 15))
            await all_in(engine, control)
            csrf = await control.call("csrf")
            # A crash of the server: every session and queued message is gone with it.
            before = await control.call("log")
            failures = [s.client.failures for s in ingestor.sessions]
            server.kill()
            await eventually(lambda: asyncio.sleep(0, all(s.client.failures > n for s, n in
                                                          zip(ingestor.sessions, failures))),
                             "every session to notice")
            server.start()  # same port, CSRF off: GET /api/v2/me answers 404 again
            for u in names:
                await publish(control, u, range(15, 20))
            await all_in(engine, control)
            after = await control.call("log")
            ingestor.stop()
            errors = await task
        rows = log_rows(engine)
        engine.dispose()
        return errors, rows, ingestor, victim, before, after, csrf, first_token, second_token

    try:
        errors, rows, ingestor, victim, before, after, csrf, first, second = run(main())
    finally:
        server.stop()
    assert errors == []
    found = refs_by_source(rows)
    for user in names:
        assert sorted(found[user]) == list(range(20)), user  # every notification exactly once
    sessions = {s.source: s for s in ingestor.sessions}
    assert sessions[names[0]].client.handshakes == 3  # start, after the expiry, after the restart
    assert all(s.client.handshakes == 2 for name, s in sessions.items() if name != names[0])
    assert all(s.client.reconnects >= 1 for s in ingestor.sessions)
    # 402 after the expiry, then a handshake of its own.
    replies = [m for e in before if any(m.get("clientId") == victim for m in e["messages"])
               for m in e["reply"] or []]
    assert any(m.get("error", "").startswith("402") for m in replies)
    # CSRF: fetched at start and after each refusal; every Bayeux request after the rotation
    # that was not refused carried the new token (the server would have refused it).
    assert csrf["refused"] >= 3 and csrf["fetches"] >= 6 and csrf["token"] == second != first
    # The ack extension: asked for at every handshake, and each connect acknowledged a batch.
    handshakes = [e for e in before + after if e["messages"] and e["messages"][0]["channel"] == "/meta/handshake"]
    assert handshakes and all(e["messages"][0]["ext"] == {"ack": True} for e in handshakes)
    new_ids = {m["clientId"] for e in after for m in e["reply"] or []
               if m.get("channel") == "/meta/handshake" and m.get("successful")}
    assert len(new_ids) == 3
    for cid in new_ids:  # a new session's batches: acknowledged from -1 on
        acks = [m["ext"]["ack"] for e in after for m in e["messages"]
                if m.get("channel") == "/meta/connect" and m.get("clientId") == cid]
        assert acks[0] == -1 and max(acks) > 0 and acks == sorted(acks)
    # After the restart the old sessions were unknown (402) and handshook again.
    assert any(m.get("error") == "402::session_unknown" for e in after for m in e["reply"] or [])


def test_a_session_that_cannot_go_on_ends_alone(cometd, tmp_path):
    """A session told not to reconnect ends with its error; the others go on; when every session
    has ended, run() returns their errors (the command then exits 1)."""
    names = users(2)
    configs = [SessionConfig(cometd.base, u, PASSWORD.format(i)) for i, u in enumerate(names)]

    async def main():
        engine = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        ingestor = Ingestor(engine, configs, **FAST)
        task = asyncio.create_task(ingestor.run())
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)

            async def session_of(user):
                async def probe():
                    return (await control.call("users")).get(user, {}).get("sessions")
                return (await eventually(probe, f"a session of {user}"))[0]

            await control.call("advice", {"clientId": await session_of(names[0]), "advice": {"reconnect": "none"}})
            await eventually(lambda: asyncio.sleep(0, ingestor.sessions[0].client.error), "the first to end")
            await control.publish([notification(r, names[1]) for r in range(3)], user=names[1])
            await wait_rows(engine, 3)
            health = await ingestor.summary()
            await control.call("advice", {"clientId": await session_of(names[1]), "advice": {"reconnect": "none"}})
            errors = await task
        rows = log_rows(engine)
        engine.dispose()
        return errors, rows, health, ingestor

    errors, rows, health, ingestor = run(main())
    assert [name for name, _ in errors] == names
    assert all("not to reconnect" in str(exc) for _, exc in errors)
    assert refs_by_source(rows) == {names[1]: [0, 1, 2]}
    assert health["status"] == "running" and health["sessions"][0]["error"] and not health["sessions"][1]["error"]
    assert not ingestor.stopped_by_request


# -- the command: kill -9, restart, SIGTERM, credentials ---------------------------------------------

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


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_kill_9_loses_nothing_acknowledged_and_sigterm_exits_cleanly(cometd, tmp_path):
    names = users(3)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    config = tmp_path / "agents.toml"
    config.write_text(f'gws_url = "{cometd.base}"\n' + "".join(
        f'[[sessions]]\nuser = "{u}"\npassword_env = "PW_{i}"\n' + (f'source = "s{i}"\n' if i else "")
        for i, u in enumerate(names)), encoding="utf-8")
    env = {**os.environ, **{f"PW_{i}": PASSWORD.format(i) for i in range(len(names))}}
    sources = [names[0]] + [f"s{i}" for i in range(1, len(names))]
    log_path = tmp_path / "ingest.log"
    args = ["--config", str(config), "--db", db, "--metrics-port", "0"]

    async def main():
        engine = open_store(db)
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            first = _start_ingest(args, env, log_path)

            killed = asyncio.Event()

            async def stream():  # ten rounds of five per user, each once the one before last is in
                for k in range(10):
                    await asyncio.gather(*(control.publish([notification(r, u) for r in range(5 * k, 5 * k + 5)],
                                                           user=u) for u in names))

                    async def caught_up(k=k):
                        return killed.is_set() or len(await asyncio.to_thread(log_rows, engine)) >= 15 * k
                    await eventually(caught_up, "the ingestor to keep up")
            publisher = asyncio.create_task(stream())
            try:
                cmdline = Path(f"/proc/{first.pid}/cmdline").read_bytes().decode()
                await wait_rows(engine, 60, "committed rows before the kill")  # mid-stream

                async def some_acknowledged():
                    state = await control.call("users")
                    return any(state[u]["acked"] for u in names)
                await eventually(some_acknowledged, "an acknowledgement before the kill")
            finally:
                first.kill()  # kill -9: no disconnect, no final anything
                first.wait(5)
                killed.set()
            state = await control.call("users")
            acked = {u: [d["referenceId"] for d in state[u]["acked"]] for u in names}
            await publisher  # the rest of the stream goes out while no ingestor runs
            size = log_path.stat().st_size
            second = _start_ingest(args, env, log_path)
            try:
                base = await asyncio.to_thread(_metrics_url, log_path, size)

                async def everything():
                    found = refs_by_source(await asyncio.to_thread(log_rows, engine))
                    return all(set(found[s]) == set(range(50)) for s in sources)
                await eventually(everything, "every published notification in the log")
                metrics = await asyncio.to_thread(_get, f"{base}/metrics")
                second.send_signal(signal.SIGTERM)
                out, _ = await asyncio.to_thread(second.communicate, timeout=DEADLINE)
            finally:
                if second.poll() is None:
                    second.kill()
        rows = log_rows(engine)
        projected = projected_to_head(engine)
        with snapshot(engine) as conn:
            report = verify(conn)
        engine.dispose()
        return first, second, out.decode(), rows, projected, report, acked, metrics, cmdline

    first, second, out, rows, projected, report, acked, metrics, cmdline = run(main())
    assert first.returncode == -signal.SIGKILL
    assert second.returncode == 0, out
    assert projected and report.ok  # the final projection ran before exiting; chain and tables check
    found = refs_by_source(rows)
    assert set(found) == set(sources)
    for user, source in zip(names, sources):
        counts = collections.Counter(found[source])
        assert set(counts) == set(range(50))
        assert all(counts[r] == 1 for r in acked[user])  # acknowledged: never delivered again
        # A copy can only be of a notification that was never acknowledged.
        assert not {r for r, n in counts.items() if n > 1} & set(acked[user])
        assert metric(metrics, "workitem_store_notifications_appended_total", source) >= 50 - len(acked[user])
    assert f"{sources[1]}: " in out and "projections up to date" in out
    # Credentials: not on the command line, not in the logs, not in the log table.
    assert_no_secret(cmdline, log_path.read_text(encoding="utf-8"), out, *(r["payload"] for r in rows))
    assert "Authorization" not in log_path.read_text(encoding="utf-8")


def test_single_session_options_and_project_follow(cometd, tmp_path):
    [user] = users(1)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    env = {**os.environ, "GWS_PW": PASSWORD.format(0)}
    log_path = tmp_path / "ingest.log"

    async def main():
        engine = open_store(db)
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            ingest = _start_ingest(["--gws-url", cometd.base, "--user", user, "--password-env", "GWS_PW",
                                    "--source", "desk-7", "--no-project", "--db", db], env, log_path)
            follow = subprocess.Popen([sys.executable, "-m", "store", "project", "--follow",
                                       "--interval-ms", "50", "--db", db],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                await control.publish([notification(r, user) for r in range(7)], user=user)
                await wait_rows(engine, 7)
                await eventually(lambda: asyncio.to_thread(projected_to_head, engine), "project --follow")
                ingest.send_signal(signal.SIGTERM)
                follow.send_signal(signal.SIGINT)
                ingest_out, _ = await asyncio.to_thread(ingest.communicate, timeout=DEADLINE)
                follow_out, follow_err = await asyncio.to_thread(follow.communicate, timeout=DEADLINE)
            finally:
                for p in (ingest, follow):
                    if p.poll() is None:
                        p.kill()
            state = await control.call("users")
        rows = log_rows(engine)
        engine.dispose()
        return ingest, follow, ingest_out.decode(), follow_out.decode(), follow_err.decode(), rows, state

    ingest, follow, ingest_out, follow_out, follow_err, rows, state = run(main())
    assert ingest.returncode == 0, ingest_out
    assert follow.returncode == 0, follow_err
    assert refs_by_source(rows) == {"desk-7": list(range(7))}
    assert "desk-7: 7 received, 7 appended" in ingest_out and "projections up to date" not in ingest_out
    assert "applied 7 events" in follow_out and "stopped; projections at seq 7" in follow_out
    assert state[user]["sessions"] == []  # disconnected cleanly on SIGTERM


# -- configuration -------------------------------------------------------------------------------------

def test_config_file_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("A_PW", "secret-a")
    path = tmp_path / "c.toml"

    def load(text: str, **kw):
        path.write_text(text, encoding="utf-8")
        return load_config(path, **kw)

    [a, b] = load('gws_url = "http://gws:8080"\n[[sessions]]\nuser = "a"\npassword_env = "A_PW"\n'
                  '[[sessions]]\nuser = "b"\npassword = "plain"\nsource = "bee"\ngws_url = "http://other"\n')
    assert (a.user, a.password, a.source_name, a.notifications_url) == (
        "a", "secret-a", "a", "http://gws:8080/api/v2/notifications")
    assert (b.source_name, b.gws_url) == ("bee", "http://other")
    assert "secret-a" not in repr(a) and "plain" not in repr(b)
    [c] = load('[[sessions]]\nuser = "c"\npassword_env = "A_PW"\n', gws_url="http://from-option")
    assert c.gws_url == "http://from-option"
    for text, error in [
        ('gws_url = "x"\n[[sessions]]\nuser = "a"\npassword_env = "NOPE_PW"\n', "NOPE_PW is not set"),
        ('gws_url = "x"\n[[sessions]]\nuser = "a"\n', "exactly one of password_env or password"),
        ('gws_url = "x"\n[[sessions]]\nuser = "a"\npassword = "p"\npassword_env = "A_PW"\n', "exactly one"),
        ('[[sessions]]\nuser = "a"\npassword = "p"\n', "gws_url is missing"),
        (('gws_url = "x"\n[[sessions]]\nuser = "a"\npassword = "p"\n'
          '[[sessions]]\nuser = "b"\npassword = "p"\nsource = "a"\n'), "source given to several sessions: a"),
        ('gws_url = "x"\n', "no [[sessions]]"),
        ('gws_url = "x"\n[[sessions]]\nuser = "a"\npasword = "p"\n', "unknown keys pasword"),
        ("gws_url = \n", "not TOML"),
    ]:
        with pytest.raises(StoreError, match=re.escape(error)):
            load(text)


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
