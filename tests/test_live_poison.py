"""Issue 8, live: a session fed each poison message keeps going, on both engines.

The real ingestor (store/ingest/service.py: GWS session, Bayeux client, writer, projector) follows
one user of the CometD test double (tests/cometd/server.js).  Each poison of
``cometd_server.POISON`` is published raw (``Control.publish_raw``: the response body holds the
text or bytes exactly as given, never re-serialised), one at a time, then 100 ordinary
notifications.  Whatever the poison, it must become one row of the log (quarantined where no
classification may take it in), be acknowledged once (no redelivery, no new session), and the 100
after it must arrive and be projected.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp
from cometd_server import CHANNEL, DEADLINE, POISON, Control, eventually, notification
from sqlalchemy import func, select

from store.db import open_store
from store.ingest.config import SessionConfig
from store.ingest.gws import GwsSession
from store.ingest.service import Ingestor, store_identity
from store.ingest.spool import Spool
from store.ingest.writer import DurableLog
from store.schema import event_log, projection_checkpoints, workitems
from store.verify import verify

FAST = {"backoff_base": 0.02, "backoff_cap": 0.2}
NORMAL = 100


def log_rows(engine) -> list[dict]:
    c = event_log.c
    query = select(c.seq, c.kind, c.session, c.payload, c.duplicate_of, c.quarantine_reason, c.workitem_id)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query.order_by(c.seq))]


def notification_count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).where(event_log.c.kind == "notification")).scalar_one()


def projected_to_head(engine) -> bool:
    with engine.connect() as conn:
        head = conn.execute(select(func.max(event_log.c.seq))).scalar() or 0
        lowest = conn.execute(select(func.min(projection_checkpoints.c.last_seq))).scalar()
    return lowest == head


def expected_payload(text: str | bytes, as_message: bool) -> str:
    """The text the log keeps for a poison: the message's raw text as received (a byte that is
    not UTF-8 as the four characters \\xNN, see bayeux.decode_body)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    return text if as_message else f'{{"channel":"{CHANNEL}","data":{text}}}'


def test_a_live_session_fed_each_poison_message_keeps_going(cometd, db_url, tmp_path):
    user = f"poisoned-{uuid.uuid4().hex[:6]}"
    config = SessionConfig(cometd.base, user, "pw")

    async def count_reaches(engine, count: int, what: str):
        async def probe():
            return await asyncio.to_thread(notification_count, engine) >= count
        await eventually(probe, what)

    async def main():
        engine = open_store(db_url)
        ingestor = Ingestor(engine, [config], spool_dir=tmp_path / "spool", **FAST)
        [session] = ingestor.sessions
        task = asyncio.create_task(ingestor.run())
        timings = {}
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)

            async def subscribed():
                return any(s["user"] == user and CHANNEL in s["subscriptions"] for s in await control.call("sessions"))
            await eventually(subscribed, "the session to subscribe")
            for count, (name, text, as_message, _) in enumerate(POISON, 1):
                started = time.monotonic()
                await control.publish_raw([text], user=user, as_message=as_message)
                await count_reaches(engine, count, f"the poison {name!r} in the log")
                timings[name] = time.monotonic() - started
            for start in range(0, NORMAL, 25):
                await control.publish([notification(r, user) for r in range(start, start + 25)], user=user)
            await count_reaches(engine, len(POISON) + NORMAL, f"the {NORMAL} notifications after the poison")
            await eventually(lambda: asyncio.to_thread(projected_to_head, engine), "projections to reach the head")
            client = session.client
            counters = (client.handshakes, client.reconnects, client.failures, client.callback_failures,
                        session.stats.not_durable, session.stats.received)
            ingestor.stop()
            errors = await asyncio.wait_for(task, DEADLINE)
        rows = log_rows(engine)
        with engine.connect() as conn:
            items = {w.workitem_id: w.state for w in conn.execute(select(workitems.c.workitem_id, workitems.c.state))}
            report = verify(conn)
        engine.dispose()
        return errors, counters, rows, items, report, timings

    errors, counters, rows, items, report, timings = asyncio.run(asyncio.wait_for(main(), 120))
    assert errors == []
    # One session from start to end: no poison made the client fail, re-handshake or be sent a
    # batch again (each was received once and taken at once).
    handshakes, reconnects, failures, callback_failures, not_durable, received = counters
    assert (handshakes, reconnects, failures, callback_failures, not_durable) == (1, 0, 0, 0, 0), timings
    assert received == len(POISON) + NORMAL
    markers = [json.loads(r["payload"])["event"] for r in rows if r["kind"] == "session"]
    assert markers == ["started", "ended"]
    assert len({r["session"] for r in rows}) == 1

    notes = [r for r in rows if r["kind"] == "notification"]
    assert len(notes) == len(POISON) + NORMAL and all(r["duplicate_of"] is None for r in notes)
    # Every poison is a row of its own, in order, with the text received.
    for (name, text, as_message, must_quarantine), row in zip(POISON, notes, strict=False):  # (the NORMAL rows follow)
        assert row["payload"] == expected_payload(text, as_message), name
        if must_quarantine:
            assert row["quarantine_reason"], name
    # The 100 after it arrived, in order, valid, and are projected.
    after = notes[len(POISON):]
    assert [json.loads(r["payload"])["data"]["referenceId"] for r in after] == list(range(NORMAL))
    assert all(r["quarantine_reason"] is None for r in after)
    assert all(items.get(f"{user}-{r}") == "Invited" for r in range(NORMAL))
    # The chain and the extracted columns hold over every row, poison included.
    assert report.chain_break is None and report.column_mismatch is None
    assert report.ok, (report.differences, report.lagging)


def test_a_marker_carrying_unstorable_server_text_is_stored(db_url, tmp_path):
    """A marker says what the server said (an error, advice): a JSON "\\ud800" or "\\u0000" there
    arrives as an unpaired surrogate or NUL, which neither UTF-8 (the spool) nor PostgreSQL text
    can hold; the marker keeps them as visible escapes instead of failing to be written, forever."""
    cause = "402::\ud800 unknown \x00 client \udfff"

    async def main():
        engine = open_store(db_url)
        writer = DurableLog(engine, Spool.create(tmp_path / "spool", store_identity(engine)))
        entries = []
        append = writer.append
        writer.append = lambda entry: entries.append(entry) or append(entry)
        session = GwsSession(SessionConfig("http://127.0.0.1:9", "agent", "pw"), writer, instance="i")
        session.session_id = "i/agent/1"
        await session._mark("lost", time.time(), cause=cause)
        await session.stop()
        await writer.close()
        rows = log_rows(engine)
        with engine.connect() as conn:
            report = verify(conn)
        engine.dispose()
        return rows, entries, report

    [row], [entry], report = asyncio.run(asyncio.wait_for(main(), 30))
    assert row["payload"] == entry.texts[0] and row["quarantine_reason"] is None
    marker = json.loads(row["payload"])
    assert marker["event"] == "lost" and marker["cause"] == "402::\\ud800 unknown \\u0000 client \\udfff"
    entry.to_line().encode("utf-8")  # the spool, had the database been away, could take it too
    assert report.chain_break is None and report.column_mismatch is None
