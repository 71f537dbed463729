"""The append-only event log: appending batches (seq, duplicates, hash chain) and reading back.

The only writer of ``event_log``.  Rows are never updated or deleted (triggers refuse it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import Connection, func, select, text

from .db import insert_rows
from .notifications import Notification, load_json, utc_text
from .schema import event_log

GENESIS_HASH = "0" * 64
_IN_CHUNK = 900  # parameters per IN (...) list, well under every engine's limit


def chain_hash(prev: str, seq: int, received_at: dt.datetime, source: str, payload_sha256: str,
               duplicate_of: int | None, quarantine_reason: str | None) -> str:
    """sha256 over the previous row's chain_hash and this row's content (docs/SQL.md, event_log)."""
    content = "\n".join((
        prev, str(seq), utc_text(received_at),
        source, payload_sha256, "" if duplicate_of is None else str(duplicate_of), quarantine_reason or "",
    ))
    return hashlib.sha256(content.encode()).hexdigest()


def payload_sha256(payload: str) -> str:
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class AppendResult:
    first_seq: int | None
    last_seq: int | None
    appended: int
    duplicates: int
    quarantined: int


def head(conn: Connection) -> tuple[int, str]:
    """(seq, chain_hash) of the last row; (0, GENESIS_HASH) for an empty log."""
    row = conn.execute(
        select(event_log.c.seq, event_log.c.chain_hash).order_by(event_log.c.seq.desc()).limit(1)
    ).first()
    return (row.seq, row.chain_hash) if row else (0, GENESIS_HASH)


def lock_for_append(conn: Connection) -> None:
    """Serialise appenders so that seq order is commit order.

    PostgreSQL: an EXCLUSIVE table lock (readers still read) held to commit; the next writer reads
    the head only after this one committed, so no reader ever sees seq N+1 while N is in flight.
    SQLite: the write transaction (BEGIN IMMEDIATE, see db.write_transaction) already is that lock.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("LOCK TABLE event_log IN EXCLUSIVE MODE"))


def _first_copies(conn: Connection, keys: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """(source, message_id) -> seq of the first copy already in the log.

    One query per source with an IN list of ids: both engines then walk the (source,
    message_id) index; a row-value IN over pairs made SQLite scan (measured: 10x slower).
    """
    by_source: dict[str, list[str]] = {}
    for source, message_id in keys:
        by_source.setdefault(source, []).append(message_id)
    c = event_log.c
    found: dict[tuple[str, str], int] = {}
    for source, ids in by_source.items():
        for i in range(0, len(ids), _IN_CHUNK):
            rows = conn.execute(
                select(c.message_id, func.min(c.seq))
                .where(c.source == source, c.message_id.in_(ids[i : i + _IN_CHUNK]))
                .group_by(c.message_id)
            )
            found.update(((source, message_id), seq) for message_id, seq in rows)
    return found


def append(conn: Connection, notifications: Sequence[Notification], *, source: str,
           received_at: dt.datetime) -> AppendResult:
    """Append a batch inside the caller's write transaction (see db.write_transaction).

    ``source`` and ``received_at`` apply to notifications that do not carry their own (those
    that came without an envelope).
    """
    if not notifications:
        return AppendResult(None, None, 0, 0, 0)
    lock_for_append(conn)
    seq, prev = head(conn)
    first_seq = seq + 1
    keys = {(n.source or source, n.message_id) for n in notifications if n.message_id is not None}
    first_copy = _first_copies(conn, keys) if keys else {}
    rows: list[dict[str, Any]] = []
    duplicates = quarantined = 0
    for n in notifications:
        seq += 1
        row_source = n.source or source
        at = n.received_at or received_at
        duplicate_of = None
        if n.message_id is not None:
            key = (row_source, n.message_id)
            duplicate_of = first_copy.setdefault(key, seq)
            if duplicate_of == seq:
                duplicate_of = None
            else:
                duplicates += 1
        if n.quarantine_reason is not None:
            quarantined += 1
        digest = payload_sha256(n.payload)
        prev = chain_hash(prev, seq, at, row_source, digest, duplicate_of, n.quarantine_reason)
        rows.append({
            "seq": seq, "received_at": at, "source": row_source, "channel": n.channel,
            "message_id": n.message_id, "message_type": n.message_type,
            "notification_type": n.notification_type, "workitem_id": n.workitem_id,
            "reference_id": n.reference_id, "payload": n.payload, "payload_sha256": digest,
            "chain_hash": prev, "duplicate_of": duplicate_of, "quarantine_reason": n.quarantine_reason,
        })
    insert_rows(conn, event_log, rows)
    return AppendResult(first_seq, seq, len(rows), duplicates, quarantined)


# -- reading -----------------------------------------------------------------------------------

class Event(NamedTuple):
    """A projectable log row (not a duplicate, not quarantined), with its message's ``data``."""

    seq: int
    received_at: dt.datetime
    source: str
    notification_type: str
    workitem_id: str | None
    reference_id: str | None
    data: dict
    workitem: dict  # data.workitem, or {} when absent or not an object


def event_from_row(row, data: dict) -> Event:
    """An Event from a row whose first six columns are Event's, and its message's data."""
    workitem = data.get("workitem")
    return Event(*row[:6], data, workitem if isinstance(workitem, dict) else {})


def read_events(conn: Connection, after_seq: int, upto_seq: int | None = None,
                chunk: int = 5000) -> Iterator[list[Event]]:
    """Projectable events with after_seq < seq <= upto_seq, in seq order, in lists of ``chunk``."""
    c = event_log.c
    query = (
        select(c.seq, c.received_at, c.source, c.notification_type, c.workitem_id, c.reference_id, c.payload)
        .where(c.duplicate_of.is_(None), c.quarantine_reason.is_(None))
        .order_by(c.seq)
        .limit(chunk)
    )
    if upto_seq is not None:
        query = query.where(c.seq <= upto_seq)
    while True:
        rows = conn.execute(query.where(c.seq > after_seq)).all()
        if not rows:
            return
        yield [event_from_row(r, load_json(r[6])["data"]) for r in rows]
        after_seq = rows[-1][0]
