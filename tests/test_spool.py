"""The writer of live ingest (store/ingest/writer.py) and its spool (store/ingest/spool.py), on both
engines: direct group commits, spooling while the log cannot be written (a lock held by another
writer), draining in order, the bound, spools left by a process that died, and the markers of
the sessions it never ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import threading

import pytest
from cometd_server import eventually
from helpers import data, log_rows
from sqlalchemy import select, text

from store.ingest.spool import Entry, Spool
from store.ingest.writer import DurableLog, SpoolFull
from store.projections import runner
from store.schema import event_log
from store.verify import verify

UTC = dt.UTC
T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def batch(session: str, n: int, *refs: int, source: str = "agent-1") -> Entry:
    texts = [json.dumps({"channel": "/v2/me/workitems", "data": data("StatusChange", f"W{r}", state="Invited", ref=r)})
             for r in refs]
    return Entry("notification", source, session, T0 + dt.timedelta(seconds=n), texts)


def started(session: str, n: int, source: str = "agent-1") -> Entry:
    marker = {"event": "started", "source": source, "handshake_at": (T0 + dt.timedelta(seconds=n)).isoformat()}
    return Entry("session", source, session, T0 + dt.timedelta(seconds=n), [json.dumps(marker)])


def refs(engine) -> list:
    with engine.connect() as conn:
        payloads = [(r["kind"], json.loads(r["payload"])) for r in log_rows(conn)]
    return [(kind, p.get("data", {}).get("referenceId") or p.get("event")) for kind, p in payloads]


@contextlib.contextmanager
def write_lock(engine):
    """Another writer holding the log's write lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: the
    appenders' table lock), released when the block ends."""
    conn = engine.connect()
    try:
        if engine.dialect.name == "sqlite":
            raw = conn.connection.driver_connection
            raw.execute("BEGIN IMMEDIATE")
            yield
            raw.execute("ROLLBACK")
        else:
            transaction = conn.begin()
            conn.execute(text("LOCK TABLE event_log IN EXCLUSIVE MODE"))
            yield
            transaction.rollback()
    finally:
        conn.close()


def test_group_commit_when_the_log_takes_it(engine, tmp_path):
    async def main():
        writer = DurableLog(engine, Spool.create(tmp_path, "store"), spool_after=5)
        writer.start()
        results = await asyncio.gather(writer.append(started("s1", 0)), writer.append(batch("s1", 1, 1, 2)),
                                       writer.append(batch("s1", 2, 3)))
        await writer.close()
        return writer, results

    writer, results = run(main())
    assert [r.appended for r in results] == [1, 2, 1] and writer.transactions <= 2
    assert refs(engine) == [("session", "started"), ("notification", 1), ("notification", 2), ("notification", 3)]
    assert not (tmp_path / writer.spool.instance).exists()  # an empty spool is removed at the end


def test_a_locked_log_spools_then_drains_in_order(engine, tmp_path):
    release = threading.Event()

    async def main():
        writer = DurableLog(engine, Spool.create(tmp_path, "store"), spool_after=0.3, probe_interval=0.2)
        writer.start()
        await writer.append(started("s1", 0))
        holder = threading.Thread(target=lambda: hold(release))
        holder.start()
        await asyncio.sleep(0.2)
        acknowledged = []
        for n in range(1, 6):  # each one durable (spooled) in well under a second
            await asyncio.wait_for(writer.append(batch("s1", n, n)), 2)
            acknowledged.append(n)
        status_during = (writer.spooling, writer.status.writable, writer.spool_bytes())
        release.set()
        holder.join()
        await eventually(lambda: not writer.spooling, "the drain")
        await writer.append(batch("s1", 9, 9))
        status_after = (writer.spooling, writer.status.writable, writer.spool_bytes())
        await writer.close()
        return acknowledged, status_during, status_after

    def hold(done):
        with write_lock(engine):
            done.wait(30)

    acknowledged, during, after = run(main())
    assert acknowledged == [1, 2, 3, 4, 5]
    assert during[0] is True and during[1] is False and during[2] > 0
    assert after == (False, True, 0)
    assert refs(engine) == [("session", "started")] + [("notification", n) for n in (1, 2, 3, 4, 5, 9)]
    runner.project(engine)
    with engine.connect() as conn:
        assert verify(conn).ok


def test_a_full_spool_refuses_notifications_but_takes_markers(engine, tmp_path):
    release = threading.Event()

    def hold():
        with write_lock(engine):
            release.wait(30)

    async def main():
        writer = DurableLog(engine, Spool.create(tmp_path, "store"), spool_after=0.2, spool_max=600)
        writer.start()
        holder = threading.Thread(target=hold)
        holder.start()
        await asyncio.sleep(0.2)
        await writer.append(batch("s1", 1, 1, 2))  # spooled
        with pytest.raises(SpoolFull, match="--spool-max"):
            await writer.append(batch("s1", 2, 3, 4, 5))
        await writer.append(started("s2", 3))  # a marker passes
        release.set()
        holder.join()
        await eventually(lambda: not writer.spooling, "the drain")
        await writer.append(batch("s1", 4, 3, 4, 5))  # room again
        await writer.close()

    run(main())
    assert refs(engine) == [("notification", 1), ("notification", 2), ("session", "started"),
                            ("notification", 3), ("notification", 4), ("notification", 5)]


def test_a_dead_processs_spool_is_drained_first_and_its_open_sessions_recorded_as_lost(engine, tmp_path):
    store = "store"
    dead = Spool.create(tmp_path, store)
    dead.add_session("dead/agent-1/1")
    dead.add_session("dead/agent-2/1")
    dead.append([started("dead/agent-1/1", 0), started("dead/agent-2/1", 0, source="agent-2"),
                 batch("dead/agent-1/1", 1, 1), batch("dead/agent-2/1", 2, 2, source="agent-2"),
                 Entry("session", "agent-2", "dead/agent-2/1", T0 + dt.timedelta(seconds=3),
                       [json.dumps({"event": "ended", "source": "agent-2"})])])
    dead.close()  # as kill -9 would: the lock is free, the files stay
    other = Spool.create(tmp_path, "another store")
    other.append([batch("x/agent-9/1", 0, 99, source="agent-9")])
    other.close()

    async def main():
        abandoned = Spool.abandoned(tmp_path, store)
        assert [s.instance for s in abandoned] == [dead.instance]
        writer = DurableLog(engine, Spool.create(tmp_path, store), abandoned, spool_after=5)
        writer.start()
        await writer.append(batch("new/agent-1/1", 10, 10))  # waits behind the old spool
        await eventually(lambda: not writer.spooling, "the drain")
        await writer.close()

    run(main())
    with engine.connect() as conn:
        rows = log_rows(conn)
    assert [(r["session"], r["kind"]) for r in rows] == [
        ("dead/agent-1/1", "session"), ("dead/agent-2/1", "session"), ("dead/agent-1/1", "notification"),
        ("dead/agent-2/1", "notification"), ("dead/agent-2/1", "session"),
        ("dead/agent-1/1", "session"),  # lost: agent-2's session had ended, agent-1's never did
        ("new/agent-1/1", "notification")]
    lost = json.loads(rows[5]["payload"])
    assert lost["event"] == "lost" and "killed or crashed" in lost["cause"] and lost["instance"] == dead.instance
    assert rows[5]["received_at"] == rows[2]["received_at"] + dt.timedelta(microseconds=1)
    assert not dead.directory.exists() and other.directory.exists()


def test_entries_a_slow_commit_stored_after_all_are_not_drained_twice(engine, tmp_path):
    spool = Spool.create(tmp_path, "store")
    entries = [started("s1", 0), batch("s1", 1, 1), batch("s1", 2, 2)]

    async def main():
        writer = DurableLog(engine, spool, spool_after=5)
        writer.start()
        for entry in entries[:2]:  # in the log already ...
            await writer.append(entry)
        spool.append(entries)  # ... and in the spool too, as when a commit outlives spool_after
        writer._spooling = True
        writer._start_drain()
        await eventually(lambda: not writer.spooling, "the drain")
        await writer.close()

    run(main())
    assert refs(engine) == [("session", "started"), ("notification", 1), ("notification", 2)]
    with engine.connect() as conn:
        assert conn.execute(select(event_log.c.seq)).all()[-1][0] == 3


def test_keys_redacted_at_ingest_are_redacted_in_the_spool_too(engine, tmp_path):
    """With keys to redact at ingest and the log locked, the spool's file never holds their clear
    values; drained, each row is stored as if redacted on arrival: the marker, the received
    text's SHA-256 (the chain and duplicates as without redaction), a redactions record."""
    from store.log import payload_sha256
    from store.redaction import INGEST_REASON, MARKER
    from store.schema import redactions

    release, spooled_bytes = threading.Event(), []
    card = {"channel": "/v2/me/workitems",
            "data": data("StatusChange", "W7", state="Invited", user_data={"CardNumber": "4111-1111", "Tier": "gold"})}
    text_in = json.dumps(card)

    async def main():
        spool = Spool.create(tmp_path, "store")
        writer = DurableLog(engine, spool, spool_after=0.3, probe_interval=0.2)
        writer.context.redact_keys = frozenset({"CardNumber"})
        writer.start()
        await writer.append(started("s1", 0))
        holder = threading.Thread(target=lambda: hold(release))
        holder.start()
        await asyncio.sleep(0.2)
        await asyncio.wait_for(writer.append(Entry("notification", "agent-1", "s1", T0, [text_in])), 2)
        assert writer.spooling
        spooled_bytes.append((spool.directory / "entries.jsonl").read_bytes())
        release.set()
        holder.join()
        await eventually(lambda: not writer.spooling, "the drain")
        await writer.close()

    def hold(done):
        with write_lock(engine):
            done.wait(30)

    run(main())
    assert b"4111-1111" not in spooled_bytes[0] and MARKER.encode() in spooled_bytes[0]
    with engine.connect() as conn:
        row = conn.execute(select(event_log.c.seq, event_log.c.payload, event_log.c.payload_sha256)
                           .where(event_log.c.workitem_id == "W7")).one()
        records = conn.execute(select(redactions.c.seq, redactions.c.reason, redactions.c["keys"])).all()
    assert json.loads(row.payload)["data"]["workitem"]["userData"] == {"CardNumber": MARKER, "Tier": "gold"}
    assert row.payload_sha256 == payload_sha256(text_in)
    assert [tuple(r) for r in records] == [(row.seq, INGEST_REASON, '["CardNumber"]')]
    runner.project(engine)
    with engine.connect() as conn:
        report = verify(conn)
    assert report.ok and report.redacted == 1
