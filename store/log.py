"""The append-only event log: appending batches (seq, duplicates, hash chain) and reading back.

The only writer of ``event_log`` and of ``event_log_counts`` (its row counts, added in the same
transaction).  Rows are never updated or deleted (triggers refuse it).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from sqlalchemy import Connection, and_, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from . import duplicates, redaction
from .bulk import insert_rows
from .db import text_sha256
from .locks import lock_for_append
from .notifications import NOTIFICATION, SESSION, SNAPSHOT, Notification, load_json, parse_timestamp, utc_text
from .reading import pages
from .schema import event_log, event_log_counts

GENESIS_HASH = "0" * 64


def chain_hash(prev: str, seq: int, received_at: dt.datetime, source: str, payload_sha256: str,
               duplicate_of: int | None, quarantine_reason: str | None, kind: str = NOTIFICATION,
               session: str | None = None) -> str:
    """sha256 over the previous row's chain_hash and this row's content (docs/RULES.md, section 8).

    A notification without a session has the seven fields of the first version of the store, so
    logs written before ``kind`` and ``session`` existed keep their hashes; any other row adds
    both fields.
    """
    fields = [prev, str(seq), utc_text(received_at), source, payload_sha256,
              "" if duplicate_of is None else str(duplicate_of), quarantine_reason or ""]
    if kind != NOTIFICATION or session is not None:
        fields += [kind, session or ""]
    return hashlib.sha256("\n".join(fields).encode()).hexdigest()


# A payload's SHA-256: the one hash of a text the store computes (redaction records and the SQL
# function of the UPDATE trigger use it too).
payload_sha256 = text_sha256


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


MICROSECOND = dt.timedelta(microseconds=1)


@dataclass
class AppendContext:
    """What one appender carries from one ``append`` call to the next: a cache of each
    session's start (when its handshake was sent), and the userData keys to redact at ingest
    (``redact_keys``, opt-in: see ``append``)."""

    session_starts: dict[str, dt.datetime | None] = field(default_factory=dict)
    redact_keys: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Batch:
    """Notifications to append together; ``source`` and ``received_at`` apply to those that do
    not carry their own (see ``append``)."""

    notifications: Sequence[Notification]
    source: str
    received_at: dt.datetime


def append(conn: Connection, notifications: Sequence[Notification], *, source: str,
           received_at: dt.datetime, context: AppendContext | None = None) -> AppendResult:
    """Append a batch inside the caller's write transaction (see db.write_transaction).

    ``source`` and ``received_at`` apply to notifications that do not carry their own (those
    that came without an envelope, and live ones); the i-th such row of the batch is stamped
    ``received_at`` plus i microseconds, so that no two rows of one reader share an instant (the
    duplicate rule 3.2 takes equal instants for the same record).  ``context`` carries what the
    duplicate rules need across calls (one per import, one per live ingestor).

    Redactions (docs/RULES.md): a notification carrying a checked redaction claim (an exported
    redacted row: ``Notification.redaction``) is stored as it is with its original
    payload_sha256 and its records; with ``context.redact_keys``, the values of those userData
    keys are replaced by the marker before the row is first written (``redaction.redact_payload``),
    recorded with reason redaction.INGEST_REASON.  Either way payload_sha256 is the original's, so the
    duplicate rules and the chain are those of the row without redaction, and the redactions
    rows are written in the caller's transaction with the row.
    """
    return append_batches(conn, [Batch(notifications, source, received_at)], context)[0]


def append_batches(conn: Connection, batches: Sequence[Batch],
                   context: AppendContext | None = None) -> list[AppendResult]:
    """Append several batches in order, with one lock (the appenders': ``locks.lock_for_append``),
    one head read and one duplicate lookup for all of them (group commit of live ingest); an
    AppendResult per batch."""
    context = context or AppendContext()
    if not any(b.notifications for b in batches):
        return [AppendResult(None, None, 0, 0, 0) for _ in batches]
    lock_for_append(conn)
    seq, prev = head(conn)
    items = [(n, b) for b in batches for n in b.notifications]
    digests = [payload_sha256(n.payload) if n.redaction is None else n.redaction[0] for n, _ in items]
    records: dict[int, list[dict]] = {}  # index in items -> its redactions records (before seq is known)
    if context.redact_keys or any(n.redaction is not None for n, _ in items):
        items = _redacted(conn, items, context.redact_keys, records)
    keys = {(n.source or b.source, n.message_id) for n, b in items if n.message_id is not None}
    first_copy = duplicates.first_copies(conn, keys) if keys else {}
    unkeyed = {d for (n, _), d in zip(items, digests, strict=True) if n.message_id is None and n.kind == NOTIFICATION}
    copies = duplicates.copies_by_payload(conn, unkeyed) if unkeyed else {}
    start = functools.partial(duplicates.session_start, conn, starts=context.session_starts)
    rows: list[dict[str, Any]] = []
    results = []
    position = 0
    redacted: list[dict] = []
    for batch in batches:
        first_seq = seq + 1
        copies_found = quarantined = unstamped = 0
        for n in batch.notifications:
            digest = digests[position]
            if records:  # (else every item is its notification)
                n = items[position][0]  # as stored (redacted at ingest)
                redacted += [{**record, "seq": seq + 1} for record in records.get(position, ())]
            position += 1
            seq += 1
            row_source = n.source or batch.source
            if n.received_at is not None:
                at = n.received_at
            else:
                at, unstamped = batch.received_at + unstamped * MICROSECOND, unstamped + 1
            duplicate_of = None
            if n.kind != NOTIFICATION:
                if n.kind == SESSION and (started := duplicates.handshake_at(n.payload)) is not None and n.session:
                    context.session_starts[n.session] = started
            elif n.message_id is not None:
                # 3.1: a message delivered again carries the same id and the same text.
                duplicate_of = first_copy.setdefault((row_source, n.message_id, digest), seq)
                if duplicate_of == seq:
                    duplicate_of = None
            else:
                same = copies.setdefault((row_source, digest), [])
                if same:
                    duplicate_of = duplicates.duplicate_without_id(n, at, same, start)
                same.append(duplicates.Copy(seq, n.session, at, duplicate_of))
            if duplicate_of is not None:
                copies_found += 1
            if n.quarantine_reason is not None:
                quarantined += 1
            prev = chain_hash(prev, seq, at, row_source, digest, duplicate_of, n.quarantine_reason, n.kind,
                              n.session)
            rows.append({
                "seq": seq, "received_at": at, "source": row_source, "channel": n.channel,
                "message_id": n.message_id, "message_type": n.message_type,
                "notification_type": n.notification_type, "workitem_id": n.workitem_id,
                "reference_id": n.reference_id, "payload": n.payload, "payload_sha256": digest,
                "chain_hash": prev, "duplicate_of": duplicate_of, "quarantine_reason": n.quarantine_reason,
                "kind": n.kind, "session": n.session,
            })
        count = len(batch.notifications)
        results.append(AppendResult(first_seq if count else None, seq if count else None, count, copies_found,
                                    quarantined))
    insert_rows(conn, event_log, rows)
    _add_counts(conn, rows)
    redaction.record(conn, redacted)
    return results


def _redacted(conn: Connection, items: list[tuple[Notification, Batch]], keys: frozenset[str],
              records: dict[int, list[dict]]) -> list[tuple[Notification, Batch]]:
    """``items`` as they are stored: a claimed redaction's records (checked when the line was
    read) kept, and ``keys`` redacted; the records of each changed item go to ``records``."""
    stored = []
    now, user = dt.datetime.now(dt.UTC), redaction.database_user(conn) if keys else ""
    for i, (n, batch) in enumerate(items):
        if n.redaction is not None:
            records[i] = [{**r, "redacted_at": parse_timestamp(r["redacted_at"])} for r in n.redaction[1]]
        changed = redaction.at_ingest(n.payload, n.kind, keys, user, now) if keys else None
        if changed is not None:
            payload, record = changed
            records.setdefault(i, []).append(record)
            n = replace(n, payload=payload)
        stored.append((n, batch))
    return stored


def _add_counts(conn: Connection, rows: list[dict]) -> None:
    """Add the rows to event_log_counts (one upsert per distinct kind, reason, duplicate)."""
    counts = Counter((r["kind"], r["quarantine_reason"] or "", r["duplicate_of"] is not None) for r in rows)
    stmt = (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(event_log_counts)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=["kind", "quarantine_reason", "duplicate"],
        set_={"rows": event_log_counts.c.rows + stmt.excluded.rows},
    ), [{"kind": kind, "quarantine_reason": reason, "duplicate": duplicate, "rows": n}
        for (kind, reason, duplicate), n in counts.items()])


def counts(conn: Connection) -> list[tuple[str, str | None, bool, int]]:
    """(kind, quarantine_reason or None, duplicate, rows) for every combination in the log."""
    c = event_log_counts.c
    return [(kind, reason or None, bool(duplicate), n)
            for kind, reason, duplicate, n in conn.execute(select(c.kind, c.quarantine_reason, c.duplicate, c.rows))
            if n]


# -- reading -----------------------------------------------------------------------------------

SNAPSHOT_EVENT = "Snapshot"  # Event.notification_type of a snapshot row


class Event(NamedTuple):
    """A projectable log row: a notification (not a duplicate, not quarantined), with its
    message's ``data``, or a snapshot (``notification_type`` "Snapshot", ``data`` the response
    body, ``reconcile`` filled in by the workitems projection: see projections/workitems.py)."""

    seq: int
    received_at: dt.datetime
    source: str
    notification_type: str
    workitem_id: str | None
    reference_id: str | None
    data: dict | None  # None when the payload cannot be read (projections record an error)
    workitem: dict  # data.workitem, or {} when absent or not an object
    reconcile: dict | None = None
    large: bool = False  # the payload is over MAX_JSON_BYTES: its values may be too (workitems.py)


# JSON values larger than this (as text) are too large for a jsonb column: projections store a
# degraded form instead (docs/RULES.md 5.1).  Only a payload at least this large can hold one.
MAX_JSON_BYTES = 16 << 20


def event_from_row(row, payload: str, kind: str = NOTIFICATION) -> Event:
    """An Event from a row whose first six columns are Event's, and its payload."""
    large = len(payload) > MAX_JSON_BYTES
    if kind == SNAPSHOT:
        return Event(row[0], row[1], row[2], SNAPSHOT_EVENT, None, None, load_json(payload), {}, {}, large)
    data = load_json(payload)["data"]
    workitem = data.get("workitem")
    return Event(row[0], row[1], row[2], row[3], row[4], row[5], data, workitem if isinstance(workitem, dict) else {},
                 None, large)


PROJECTABLE = and_(event_log.c.quarantine_reason.is_(None),
                   or_(and_(event_log.c.kind == NOTIFICATION, event_log.c.duplicate_of.is_(None)),
                       event_log.c.kind == SNAPSHOT))


def read_events(conn: Connection, after_seq: int, upto_seq: int | None = None,
                chunk: int = 5000) -> Iterator[list[Event]]:
    """Projectable events with after_seq < seq <= upto_seq, in seq order, in lists of at most ``chunk``."""
    c = event_log.c
    query = select(c.seq, c.received_at, c.source, c.notification_type, c.workitem_id, c.reference_id, c.payload,
                   c.kind).where(PROJECTABLE)
    for rows in pages(conn, query, after_seq, upto_seq, chunk):
        yield [_event(r) for r in rows]


def _event(row) -> Event:
    """An Event; one whose payload no longer reads as it was classified (a row changed in the
    database) has ``data`` None, and the projections record it as an error."""
    try:
        return event_from_row(row, row[6], row[7])
    except (ValueError, KeyError, TypeError, AttributeError):
        return Event(row[0], row[1], row[2], row[3], row[4], row[5], None, {})
