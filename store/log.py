"""The append-only event log: appending batches (seq, duplicates, hash chain) and reading back.

The only writer of ``event_log`` and of ``event_log_counts`` (its row counts, added in the same
transaction).  Rows are never updated or deleted (triggers refuse it).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from sqlalchemy import JSON, Connection, Text, and_, bindparam, cast, column, func, or_, select, text, true
from sqlalchemy.dialects import postgresql, sqlite

from .db import insert_rows
from .notifications import NOTIFICATION, SESSION, SNAPSHOT, Notification, load_json, parse_timestamp, utc_text
from .schema import event_log, event_log_counts

GENESIS_HASH = "0" * 64
_IN_CHUNK = 900  # parameters per IN (...) list, well under every engine's limit


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


# Two sessions following one agent receive each notification at nearly the same moment; copies
# further apart than this are never taken for one notification (docs/RULES.md, section 3).
SAME_NOTIFICATION_WINDOW = dt.timedelta(seconds=60)
MICROSECOND = dt.timedelta(microseconds=1)


@dataclass
class AppendContext:
    """What one appender carries from one ``append`` call to the next: a cache of each
    session's start (when its handshake was sent)."""

    session_starts: dict[str, dt.datetime | None] = field(default_factory=dict)


@dataclass
class _Copy:
    """A log row as the duplicate rules see it."""

    seq: int
    session: str | None
    received_at: dt.datetime
    duplicate_of: int | None


def _first_copies(conn: Connection, keys: set[tuple[str, str]]) -> dict[tuple[str, str, str], int]:
    """(source, message_id, payload_sha256) -> seq of the first row with that key that is not
    itself a duplicate.

    Each key is an index probe on (source, message_id), whatever the log's size: on PostgreSQL
    one query for all keys (``_first_copies_probed``), on SQLite IN lists
    (``_first_copies_in_lists``).
    """
    if conn.dialect.name == "postgresql":
        return _first_copies_probed(conn, keys)
    return _first_copies_in_lists(conn, keys)


def _first_copies_in_lists(conn: Connection, keys: set[tuple[str, str]]) -> dict[tuple[str, str, str], int]:
    """One query per source with an IN list of ids: SQLite probes the (source, message_id) index
    id by id; a row-value IN over pairs made it scan (measured: 10x slower).

    Not for PostgreSQL: inside an import's transaction (no statistics yet) it planned this as a
    scan of all the source's rows, filtered: 0.3 s a batch at 100,000 rows and growing with the log.
    """
    by_source: dict[str, list[str]] = {}
    for source, message_id in keys:
        by_source.setdefault(source, []).append(message_id)
    c = event_log.c
    found: dict[tuple[str, str, str], int] = {}
    for source, ids in by_source.items():
        for i in range(0, len(ids), _IN_CHUNK):
            rows = conn.execute(
                select(c.message_id, c.payload_sha256, func.min(c.seq))
                .where(c.source == source, c.message_id.in_(ids[i : i + _IN_CHUNK]), c.duplicate_of.is_(None))
                .group_by(c.message_id, c.payload_sha256)
            )
            found.update(((source, message_id, digest), seq) for message_id, digest, seq in rows)
    return found


# PostgreSQL's lookups take the batch's keys as one JSON array (orjson writes it 4x faster than
# psycopg adapts text[] lists) and join each key LATERAL to its rows: a nested loop of index
# probes.  The planner's estimate for a set-returning function, 100 rows, keeps a 20,000-key
# lookup under jit_above_cost (JIT compiling took longer than the lookup).  GROUP BY, and
# OFFSET 0, keep the LATERAL subquery from being flattened into a join, which could be planned
# as a hash join over the whole log.
def _json_rows(name: str, function, *columns, typed: bool = False):
    """A set-returning JSON function of the bind parameter ``name`` (JSON text), as a table
    (``typed``: with its column definition list, for a function returning records)."""
    return function(cast(bindparam(name, type_=Text), JSON)).table_valued(*columns).render_derived(
        name="k", with_types=typed)


_keys = _json_rows("keys", func.json_to_recordset, column("source", Text), column("message_id", Text), typed=True)
_e = event_log.alias("e")
_first = (select(_e.c.payload_sha256, func.min(_e.c.seq).label("seq"))
          .where(_e.c.source == _keys.c.source, _e.c.message_id == _keys.c.message_id, _e.c.duplicate_of.is_(None))
          .group_by(_e.c.payload_sha256).lateral("f"))
_FIRST_COPIES_PROBED = select(_keys.c.source, _keys.c.message_id, _first.c.payload_sha256, _first.c.seq) \
    .select_from(_keys.join(_first, true()))
_PAYLOAD_COLUMNS = (event_log.c.seq, event_log.c.source, event_log.c.payload_sha256, event_log.c.session,
                    event_log.c.received_at, event_log.c.duplicate_of)
_digests = _json_rows("digests", func.json_array_elements_text, column("digest", Text))
_copies = (select(*(_e.c[col.name] for col in _PAYLOAD_COLUMNS))
           .where(_e.c.message_id.is_(None), _e.c.payload_sha256 == _digests.c.digest, _e.c.kind == NOTIFICATION)
           .offset(0).lateral("c"))
_COPIES_BY_PAYLOAD_PROBED = select(*_copies.c).select_from(_digests.join(_copies, true()))


def _first_copies_probed(conn: Connection, keys: set[tuple[str, str]]) -> dict[tuple[str, str, str], int]:
    """``_first_copies`` for PostgreSQL: one query, an index probe per key."""
    # In index order: neighbouring probes read neighbouring pages.
    keys_json = orjson.dumps([{"source": s, "message_id": i} for s, i in sorted(keys)]).decode()
    rows = conn.execute(_FIRST_COPIES_PROBED, {"keys": keys_json})
    return {(source, message_id, digest): seq for source, message_id, digest, seq in rows}


def _copies_by_payload(conn: Connection, digests: set[str]) -> dict[tuple[str, str], list[_Copy]]:
    """(source, payload_sha256) -> the notification rows without message_id that have that
    payload, in seq order (the partial index on payload_sha256 holds exactly those rows).

    Each digest is an index probe on that partial index: on PostgreSQL one query for all
    (``_payload_rows_probed``; an IN list was planned as a scan of every row without
    message_id, filtered: 14 s for a batch of 20,000 at 100,000 such rows), on SQLite IN lists
    (``_payload_rows_in_lists``).
    """
    fetch = _payload_rows_probed if conn.dialect.name == "postgresql" else _payload_rows_in_lists
    found: dict[tuple[str, str], list[_Copy]] = {}
    for seq, source, digest, session, at, duplicate_of in fetch(conn, sorted(digests)):
        found.setdefault((source, digest), []).append(_Copy(seq, session, at, duplicate_of))
    for copies in found.values():
        copies.sort(key=lambda copy: copy.seq)
    return found


def _payload_rows_in_lists(conn: Connection, digests: list[str]) -> list[tuple]:
    c = event_log.c
    query = select(*_PAYLOAD_COLUMNS).where(c.message_id.is_(None), c.kind == NOTIFICATION)
    return [row for i in range(0, len(digests), _IN_CHUNK)
            for row in conn.execute(query.where(c.payload_sha256.in_(digests[i : i + _IN_CHUNK])))]


def _payload_rows_probed(conn: Connection, digests: list[str]) -> list[tuple]:
    return conn.execute(_COPIES_BY_PAYLOAD_PROBED, {"digests": orjson.dumps(digests).decode()}).all()


def session_start(conn: Connection, session: str, context: AppendContext) -> dt.datetime | None:
    """When ``session`` sent its handshake, from its "started" marker; None when the log has none."""
    if session not in context.session_starts:
        c = event_log.c
        payloads = conn.execute(select(c.payload).where(c.session == session, c.kind == SESSION)
                                .order_by(c.received_at)).scalars()
        context.session_starts[session] = next(filter(None, map(_handshake_at, payloads)), None)
    return context.session_starts[session]


def _handshake_at(payload: str) -> dt.datetime | None:
    try:
        marker = load_json(payload)
        return parse_timestamp(marker["handshake_at"]) if marker.get("event") == "started" else None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        return None


def _duplicate_without_id(n: Notification, at: dt.datetime, copies: list[_Copy],
                          start: Callable[[str], dt.datetime | None]) -> int | None:
    """The seq a notification without message_id duplicates (docs/RULES.md 3.2 and 3.3), or None.

    ``copies``: the earlier notification rows without message_id with the same source and
    payload, in seq order.  ``start(session)``: when that session sent its handshake.
    """
    if n.received_at is not None:
        # 3.2: the same record again (overlapping captures or exports): a row whose own
        # received_at (not the time of reading), session and payload equal an earlier row's.
        for first in copies:
            if first.duplicate_of is None and first.received_at == at and first.session == n.session:
                return first.seq
    if n.session is None or (mine := start(n.session)) is None:
        return None
    # 3.3: one notification received by two sessions of the same source: a row of another
    # session that could have received this one (each row came after the other's handshake),
    # within the window, and that no row of this session took yet.
    for first in copies:
        if (first.duplicate_of is None and first.session is not None and first.session != n.session
                and abs(first.received_at - at) <= SAME_NOTIFICATION_WINDOW and first.received_at > mine
                and (theirs := start(first.session)) is not None and at > theirs
                and not any(copy.duplicate_of == first.seq and copy.session == n.session for copy in copies)):
            return first.seq
    return None


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
    """
    return append_batches(conn, [Batch(notifications, source, received_at)], context)[0]


def append_batches(conn: Connection, batches: Sequence[Batch],
                   context: AppendContext | None = None) -> list[AppendResult]:
    """Append several batches in order, with one lock, one head read and one duplicate lookup
    for all of them (group commit of live ingest); an AppendResult per batch."""
    context = context or AppendContext()
    if not any(b.notifications for b in batches):
        return [AppendResult(None, None, 0, 0, 0) for _ in batches]
    lock_for_append(conn)
    seq, prev = head(conn)
    items = [(n, b) for b in batches for n in b.notifications]
    digests = [payload_sha256(n.payload) for n, _ in items]
    keys = {(n.source or b.source, n.message_id) for n, b in items if n.message_id is not None}
    first_copy = _first_copies(conn, keys) if keys else {}
    unkeyed = {d for (n, _), d in zip(items, digests, strict=True) if n.message_id is None and n.kind == NOTIFICATION}
    copies = _copies_by_payload(conn, unkeyed) if unkeyed else {}
    start = functools.partial(session_start, conn, context=context)
    rows: list[dict[str, Any]] = []
    results = []
    position = 0
    for batch in batches:
        first_seq = seq + 1
        duplicates = quarantined = unstamped = 0
        for n in batch.notifications:
            digest = digests[position]
            position += 1
            seq += 1
            row_source = n.source or batch.source
            if n.received_at is not None:
                at = n.received_at
            else:
                at, unstamped = batch.received_at + unstamped * MICROSECOND, unstamped + 1
            duplicate_of = None
            if n.kind != NOTIFICATION:
                if n.kind == SESSION and (started := _handshake_at(n.payload)) is not None and n.session:
                    context.session_starts[n.session] = started
            elif n.message_id is not None:
                # 3.1: a message delivered again carries the same id and the same text.
                duplicate_of = first_copy.setdefault((row_source, n.message_id, digest), seq)
                if duplicate_of == seq:
                    duplicate_of = None
            else:
                same = copies.setdefault((row_source, digest), [])
                if same:
                    duplicate_of = _duplicate_without_id(n, at, same, start)
                same.append(_Copy(seq, n.session, at, duplicate_of))
            if duplicate_of is not None:
                duplicates += 1
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
        results.append(AppendResult(first_seq if count else None, seq if count else None, count, duplicates,
                                    quarantined))
    insert_rows(conn, event_log, rows)
    _add_counts(conn, rows)
    return results


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
    data: dict  # None when the payload cannot be read (projections record an error)
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
    return Event(*row[:6], data, workitem if isinstance(workitem, dict) else {}, None, large)


PROJECTABLE = and_(event_log.c.quarantine_reason.is_(None),
                   or_(and_(event_log.c.kind == NOTIFICATION, event_log.c.duplicate_of.is_(None)),
                       event_log.c.kind == SNAPSHOT))


def read_events(conn: Connection, after_seq: int, upto_seq: int | None = None,
                chunk: int = 5000) -> Iterator[list[Event]]:
    """Projectable events with after_seq < seq <= upto_seq, in seq order, in lists of ``chunk``."""
    c = event_log.c
    query = (
        select(c.seq, c.received_at, c.source, c.notification_type, c.workitem_id, c.reference_id, c.payload,
               c.kind)
        .where(PROJECTABLE)
        .order_by(c.seq)
        .limit(chunk)
    )
    if upto_seq is not None:
        query = query.where(c.seq <= upto_seq)
    while True:
        rows = conn.execute(query.where(c.seq > after_seq)).all()
        if not rows:
            return
        yield [_event(r) for r in rows]
        after_seq = rows[-1][0]


def _event(row) -> Event:
    """An Event; one whose payload no longer reads as it was classified (a row changed in the
    database) has ``data`` None, and the projections record it as an error."""
    try:
        return event_from_row(row, row[6], row[7])
    except (ValueError, KeyError, TypeError, AttributeError):
        return Event(*row[:6], None, {})  # type: ignore[arg-type]
