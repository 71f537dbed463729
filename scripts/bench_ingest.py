"""Live-ingest benchmark: CometD notifications from the real Node CometD server into a SQLite store.

    .venv/bin/python scripts/bench_ingest.py                 # defaults: 50,000 notifications, 5 s paced
    .venv/bin/python scripts/bench_ingest.py --events 200000 --paced-seconds 10 --workdir /tmp/b

The server is tests/cometd/server.js (npm cometd-nodejs-server with its ack extension; `npm ci`
runs in tests/cometd if node_modules is missing); notifications are published through its
/control/publish API, each to one session, with the data of the seeded simulator
(store.simulate.Simulator, one agent per session).  Each session is a BayeuxClient whose
on_batch classifies the batch (store.notifications.classify) and appends it in one transaction
(store.log.append inside store.db.write_transaction, or the writer of store/ingest/writer.py) before
the batch is acknowledged.  Last, the rate at which a spool left by a dead ingest process drains
into the log, against the same writer appending the same entries directly.

Two ways to commit (--commit): ``per-batch``, each on_batch appends its batch in a transaction of
its own; ``group``, the batches waiting at a moment share one transaction (each batch still
all-or-nothing, acknowledged after the commit) -- see Store.

Two measurements, each with 1 and with 50 sessions:
- sustained rate: every notification published as fast as the control API takes them; the rate
  is notifications / (first publish -> last row committed);
- latency at a paced 1,000 notifications/s: the publisher (a process of its own) writes the
  wall-clock time into each message's data (``benchPublishedAt``) just before its
  /control/publish request, so the figure includes that request; latency = commit time of its
  row - that time; p50 and p99.

Targets: sustained >= 10,000 notifications/s; p99 < 50 ms at 1,000/s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# (E402 below: the checkout's store package, and the tests' launcher, are importable only now)
from store import db  # noqa: E402
from store import log as event_log  # noqa: E402
from store.gws_protocol import CHANNEL  # noqa: E402
from store.ingest.bayeux import BayeuxClient  # noqa: E402
from store.ingest.spool import Entry, Spool  # noqa: E402
from store.ingest.writer import DurableLog, notifications_of  # noqa: E402
from store.simulate import Simulator  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from cometd_server import COMETD_DIR, NodeServer  # noqa: E402 - the tests' own launcher

TARGET_RATE, TARGET_P99_MS = 10_000, 50.0
CHUNK = 500  # messages per /control/publish request when publishing flat out


def _node() -> str:
    """node, after `npm ci` in tests/cometd if its node_modules is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        sys.exit("node and npm are needed (the CometD server is tests/cometd/server.js)")
    if not (COMETD_DIR / "node_modules" / "cometd-nodejs-server").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=COMETD_DIR, check=True)
    return node


class Store:
    """The on_batch side; counts and latencies of stored rows.

    ``group`` False: each on_batch appends its batch in a transaction of its own, inline.
    ``group`` True (what `workitem-store ingest` does): on_batch hands its batch to
    store.ingest.writer.DurableLog and waits; the writer appends every batch waiting at that
    moment in one transaction (group commit), then releases them all, or spools them when the
    database is slow.  A batch is still all-or-nothing and acknowledged only once durable;
    sessions just share the commit (the fsync) instead of queueing for one each.
    """

    def __init__(self, path: Path, group: bool = False):
        self.engine = db.open_store(f"sqlite:///{path}")
        self.writer = DurableLog(self.engine, Spool.create(Path(f"{path}.spool"), "bench")) if group else None
        self.committed = self._transactions = 0
        self.latencies: list[float] = []  # seconds, publish -> commit
        self.published: list[float] = []  # the publish times
        self.done = asyncio.Event()
        self.expect = 0
        self._next_at: dict[str, dt.datetime] = {}

    def _stamp(self, source: str, rows: int) -> dt.datetime:
        """Instants of its own for each row of a session, as GwsSession gives them."""
        at = max(dt.datetime.now(dt.UTC), self._next_at.get(source, dt.datetime.min.replace(tzinfo=dt.UTC)))
        self._next_at[source] = at + rows * dt.timedelta(microseconds=1)
        return at

    def _append(self, entry: Entry) -> None:
        with db.write_transaction(self.engine) as conn:
            event_log.append(conn, notifications_of(entry), source=entry.source, received_at=entry.received_at)
        self._transactions += 1

    @property
    def transactions(self) -> int:
        return self.writer.transactions if self.writer is not None else self._transactions

    def on_batch_for(self, source: str):
        async def on_batch(batch):
            entry = Entry("notification", source, f"bench/{source}", self._stamp(source, len(batch)),
                          [raw for _, raw in batch], [message for message, _ in batch])
            if self.writer is not None:
                await self.writer.append(entry)
            else:
                self._append(entry)
            committed_at = time.time()
            for message, _ in batch:
                published = message.get("data", {}).get("benchPublishedAt")
                if published is not None:
                    self.latencies.append(committed_at - published)
                    self.published.append(published)
            self.committed += len(batch)
            if self.committed >= self.expect:
                self.done.set()
        return on_batch

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.close()
        self.engine.dispose()

    def rows(self) -> int:
        from sqlalchemy import func, select

        from store.schema import event_log as table
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(table)).scalar_one()


async def spool_drain(workdir: Path, events: int, seed: int, per_entry: int = 20) -> tuple[float, float]:
    """Notifications/s at which a spool left by a dead ingest process drains into the log, and
    the same entries appended directly by the same writer (group commit), in this run."""
    data = per_agent(10, events, seed)
    entries, at = [], dt.datetime.now(dt.UTC)
    for n, items in enumerate(data):
        for i in range(0, len(items), per_entry):
            texts = [json.dumps({"channel": CHANNEL, "data": d}) for d in items[i:i + per_entry]]
            entries.append(Entry("notification", f"agent-{n + 1:03d}", f"dead/agent-{n + 1:03d}/1", at, texts))
            at += dt.timedelta(milliseconds=1)
    dead = Spool.create(workdir / "drain.db.spool", "bench")
    dead.append(entries)
    dead.close()
    engine = db.open_store(f"sqlite:///{workdir / 'drain.db'}")
    writer = DurableLog(engine, Spool.create(workdir / "drain.db.spool", "bench"),
                        Spool.abandoned(workdir / "drain.db.spool", "bench"))
    started = time.perf_counter()
    writer.start()
    while writer.spooling:
        await asyncio.sleep(0.01)
    drained = events / (time.perf_counter() - started)
    await writer.close()
    engine.dispose()
    engine = db.open_store(f"sqlite:///{workdir / 'direct.db'}")
    writer = DurableLog(engine, Spool.create(workdir / "direct.db.spool", "bench"))
    started = time.perf_counter()
    await asyncio.gather(*(writer.append(e) for e in entries))
    direct = events / (time.perf_counter() - started)
    await writer.close()
    engine.dispose()
    return drained, direct


@contextlib.contextmanager
def fresh_server(workdir: Path):
    server = NodeServer(_node(), workdir / "cometd.log").start()
    try:
        yield server
    finally:
        server.stop()


async def control(http: aiohttp.ClientSession, server: NodeServer, path: str, body: dict | None = None):
    method = http.post if body is not None else http.get
    async with method(f"{server.base}/control/{path}", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"/control/{path}: HTTP {response.status} {await response.text()}")
        return await response.json()


async def start_clients(server, http, store, sessions: int) -> tuple[list[BayeuxClient], list[str]]:
    names = [f"agent-{i:03d}" for i in range(1, sessions + 1)]
    clients = [BayeuxClient(server.url, [CHANNEL], store.on_batch_for(name), backoff_base=0.05, backoff_cap=1.0)
               for name in names]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 30
    while True:
        subscribed = {s["id"] for s in await control(http, server, "sessions") if CHANNEL in s["subscriptions"]}
        if all(c.client_id in subscribed for c in clients):
            return clients, [c.client_id for c in clients]
        if time.monotonic() > deadline:
            raise RuntimeError("the clients did not all subscribe within 30 s")
        await asyncio.sleep(0.05)


def per_agent(sessions: int, count: int, seed: int) -> list[list[dict]]:
    """Each agent's notification data, from the seeded simulator."""
    out: dict[str, list[dict]] = collections.defaultdict(list)
    for source, message in Simulator(agents=sessions, seed=seed).messages(count):
        out[source].append(message["data"])
    return [out[f"agent-{i:03d}"] for i in range(1, sessions + 1)]


async def sustained(server, workdir: Path, sessions: int, events: int, seed: int,
                    group: bool) -> tuple[float, int, int]:
    """Notifications/s from the first publish to the last commit; rows in the store; transactions."""
    store = Store(workdir / f"sustained-{sessions}-{group}.db", group)
    store.expect = events
    data = per_agent(sessions, events, seed)
    async with aiohttp.ClientSession() as http:
        clients, cids = await start_clients(server, http, store, sessions)
        try:
            started = time.perf_counter()

            async def publish(cid, items):
                for i in range(0, len(items), CHUNK):
                    await control(http, server, "publish", {"channel": CHANNEL, "data": items[i:i + CHUNK], "to": cid})

            await asyncio.gather(*(publish(cid, items) for cid, items in zip(cids, data, strict=True)))
            await asyncio.wait_for(store.done.wait(), 600)
            elapsed = time.perf_counter() - started
        finally:
            await asyncio.gather(*(c.stop() for c in clients))
    rows = store.rows()
    await store.close()
    return events / elapsed, rows, store.transactions


def publish_paced(base: str, schedule: list[tuple[str, dict]], rate: float) -> None:
    """Publish ``schedule`` (client id, data) at ``rate`` per second, stamping each message's data
    with the wall-clock time of its publish request.  Runs in a process of its own, so that
    publishing does not take CPU from the ingesting event loop being measured."""
    async def run():
        async with aiohttp.ClientSession() as http:
            loop = asyncio.get_running_loop()
            started, sent, pending = loop.time(), 0, set()
            while sent < len(schedule):
                due = min(len(schedule), int((loop.time() - started) * rate) + 1)
                groups: dict[str, list[dict]] = collections.defaultdict(list)
                now = time.time()
                for cid, data in schedule[sent:due]:
                    groups[cid].append({**data, "benchPublishedAt": now})
                sent = due
                for cid, items in groups.items():
                    body = {"channel": CHANNEL, "data": items, "to": cid}
                    task = asyncio.create_task(http.post(f"{base}/control/publish", json=body))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.sleep(max(0.0, started + sent / rate - loop.time()))
            for response in await asyncio.gather(*pending):
                response.release()
    asyncio.run(run())


async def paced(server, workdir: Path, sessions: int, rate: float, seconds: float, seed: int, group: bool):
    """Latencies (ms) of notifications published at ``rate`` per second for ``seconds``."""
    store = Store(workdir / f"paced-{sessions}-{group}.db", group)
    count = int(rate * seconds)
    store.expect = count
    async with aiohttp.ClientSession() as http:
        clients, cids = await start_clients(server, http, store, sessions)
        by_agent = {f"agent-{i:03d}": cid for i, cid in enumerate(cids, 1)}
        schedule = [(by_agent[source], message["data"])
                    for source, message in Simulator(agents=sessions, seed=seed).messages(count)]
        try:
            publisher = multiprocessing.get_context("spawn").Process(
                target=publish_paced, args=(server.base, schedule, rate), name="bench publisher")
            publisher.start()
            await asyncio.wait_for(store.done.wait(), seconds + 60)
            await asyncio.get_running_loop().run_in_executor(None, publisher.join)
        finally:
            await asyncio.gather(*(c.stop() for c in clients))
    await store.close()
    stamps = store.published
    achieved = (len(stamps) - 1) / (max(stamps) - min(stamps))
    latencies = sorted(x * 1000 for x in store.latencies)

    def pick(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    return achieved, pick(0.50), pick(0.99), max(latencies), len(latencies), store.transactions


async def main(args) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        print(f"live ingest: Node CometD server (ack extension) -> BayeuxClient -> SQLite ({workdir})")
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
              "(other work on the machine skews these figures); a fresh server for each run "
              "(its control API logs every request, which slows it as the log grows)")
        modes = {"per-batch": False, "group": True} if args.commit == "both" else {args.commit: args.commit == "group"}
        for mode, group in modes.items():
            for sessions in args.sessions:
                with fresh_server(workdir) as server:
                    rate, rows, transactions = await sustained(server, workdir, sessions, args.events, args.seed, group)
                good = rate >= TARGET_RATE and rows == args.events
                ok &= good
                print(f"sustained, {mode} commit, {sessions:>2} session(s): {args.events} notifications, {rows} rows "
                      f"in {transactions} transactions, {rate:,.0f} notifications/s (target >= {TARGET_RATE:,}) "
                      f"{'OK' if good else 'MISSED'}")
            for sessions in args.sessions:
                with fresh_server(workdir) as server:
                    achieved, p50, p99, worst, n, transactions = await paced(
                        server, workdir, sessions, args.rate, args.paced_seconds, args.seed, group)
                good = p99 < TARGET_P99_MS
                ok &= good
                print(f"latency at {args.rate:,.0f}/s, {mode} commit, {sessions:>2} session(s): {n} notifications "
                      f"({achieved:,.0f}/s published, {transactions} transactions), p50 {p50:.1f} ms, "
                      f"p99 {p99:.1f} ms, max {worst:.1f} ms (target p99 < {TARGET_P99_MS:.0f} ms) "
                      f"{'OK' if good else 'MISSED'}")
        drained, direct = await spool_drain(workdir, args.events, args.seed)
        print(f"spool drain: {args.events} notifications left in a dead process's spool reach the log at "
              f"{drained:,.0f} notifications/s; the same entries appended directly: {direct:,.0f}/s "
              f"(ratio {drained / direct:.2f})")
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Live-ingest benchmark against the Node CometD server.")
    parser.add_argument("--events", type=int, default=50_000, help="notifications per sustained run (default 50000)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 50], help="session counts (default: 1 50)")
    parser.add_argument("--rate", type=float, default=1000.0, help="paced rate, notifications/s (default 1000)")
    parser.add_argument("--paced-seconds", type=float, default=5.0, help="length of each paced run (default 5)")
    parser.add_argument("--commit", choices=["per-batch", "group", "both"], default="both",
                        help="one transaction per batch, group commit of the batches waiting, or both (default)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", help="keep the SQLite files and the server log here")
    sys.exit(asyncio.run(main(parser.parse_args())))
