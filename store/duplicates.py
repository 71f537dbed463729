"""Which appended rows are duplicates (docs/RULES.md, section 3): finding the earlier copies
of a batch's notifications in the log, and the rules that decide.

The log (``log.append_batches``) asks, once per batch, for the first copies of the keyed
notifications and for every earlier copy of the unkeyed ones; each lookup is an index probe per
key, whatever the log's size.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from sqlalchemy import JSON, Connection, Text, bindparam, cast, column, func, select, text, true

from .notifications import NOTIFICATION, SESSION, Notification, load_json, parse_timestamp
from .schema import event_log

# Two sessions following one agent receive each notification at nearly the same moment; copies
# further apart than this are never taken for one notification (docs/RULES.md, section 3).
SAME_NOTIFICATION_WINDOW = dt.timedelta(seconds=60)


@dataclass
class Copy:
    """A log row as the duplicate rules see it."""

    seq: int
    session: str | None
    received_at: dt.datetime
    duplicate_of: int | None


def first_copies(conn: Connection, keys: set[tuple[str, str]]) -> dict[tuple[str, str, str], int]:
    """(source, message_id, payload_sha256) -> seq of the first row with that key that is not
    itself a duplicate.

    An index probe on (source, message_id) per key, whatever the log's size, the keys going as
    one JSON array: on PostgreSQL one query for all, on SQLite one per source (below).
    """
    # In index order: neighbouring probes read neighbouring pages.
    if conn.dialect.name == "postgresql":
        keys_json = orjson.dumps([{"source": s, "message_id": i} for s, i in sorted(keys)]).decode()
        rows = conn.execute(_FIRST_COPIES_PROBED, {"keys": keys_json})
        return {(source, message_id, digest): seq for source, message_id, digest, seq in rows}
    ids: dict[str, list[str]] = {}
    for source, message_id in sorted(keys):
        ids.setdefault(source, []).append(message_id)
    return {(source, message_id, digest): seq
            for source, in_list in ids.items()
            for message_id, digest, seq in conn.execute(
                _FIRST_COPIES_SQLITE, {"source": source, "ids": orjson.dumps(in_list).decode()})}


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

# SQLite's take the values as one JSON array too, read by json_each in an IN subquery: SQLite
# SEARCHes the index once per value (tests/test_query_plans.py).  Not a join to json_each:
# after ANALYZE of a small log SQLite put the log outside, the array inside.  Measured against
# IN lists of 900 bound ids: a third of the time for a batch of 20,000 new keys, in one
# statement per source instead of one per source and chunk.
def _json_values(name: str):
    """The elements of the bind parameter ``name`` (a JSON array of strings), as a subquery."""
    return select(func.json_each(bindparam(name, type_=Text)).table_valued("value").alias("k").c.value) \
        .scalar_subquery()


_FIRST_COPIES_SQLITE = (
    select(event_log.c.message_id, event_log.c.payload_sha256, func.min(event_log.c.seq))
    .where(event_log.c.source == bindparam("source"), event_log.c.message_id.in_(_json_values("ids")),
           event_log.c.duplicate_of.is_(None))
    .group_by(event_log.c.message_id, event_log.c.payload_sha256))
# INDEXED BY: after ANALYZE, SQLite took "message_id IS NULL" for a handful of rows (the average
# per (source, message_id) key) and skip-scanned ix_event_log_source_message_id through every
# row without message_id instead (SQLAlchemy renders no hint for SQLite: hence the text).
_COPIES_BY_PAYLOAD_SQLITE = text(
    "SELECT seq, source, payload_sha256, session, received_at, duplicate_of"
    " FROM event_log INDEXED BY ix_event_log_payload_sha256"
    " WHERE payload_sha256 IN (SELECT k.value FROM json_each(:digests) AS k)"
    " AND message_id IS NULL AND kind = :kind").bindparams(kind=NOTIFICATION).columns(*_PAYLOAD_COLUMNS)


def copies_by_payload(conn: Connection, digests: set[str]) -> dict[tuple[str, str], list[Copy]]:
    """(source, payload_sha256) -> the notification rows without message_id that have that
    payload, in seq order (the partial index on payload_sha256 holds exactly those rows).

    One query for all digests, an index probe on that partial index per digest (as
    ``first_copies``; on PostgreSQL an IN list was planned as a scan of every row without
    message_id, filtered: 14 s for a batch of 20,000 at 100,000 such rows).
    """
    query = _COPIES_BY_PAYLOAD_PROBED if conn.dialect.name == "postgresql" else _COPIES_BY_PAYLOAD_SQLITE
    found: dict[tuple[str, str], list[Copy]] = {}
    for seq, source, digest, session, at, duplicate_of in conn.execute(
            query, {"digests": orjson.dumps(sorted(digests)).decode()}):
        found.setdefault((source, digest), []).append(Copy(seq, session, at, duplicate_of))
    for copies in found.values():
        copies.sort(key=lambda copy: copy.seq)
    return found


def session_start(conn: Connection, session: str, starts: dict[str, dt.datetime | None]) -> dt.datetime | None:
    """When ``session`` sent its handshake, from its "started" marker; None when the log has none.
    ``starts`` caches the answers (``log.AppendContext.session_starts``)."""
    if session not in starts:
        c = event_log.c
        payloads = conn.execute(select(c.payload).where(c.session == session, c.kind == SESSION)
                                .order_by(c.received_at)).scalars()
        starts[session] = next(filter(None, map(handshake_at, payloads)), None)
    return starts[session]


def handshake_at(payload: str) -> dt.datetime | None:
    try:
        marker = load_json(payload)
        return parse_timestamp(marker["handshake_at"]) if marker.get("event") == "started" else None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        return None


def duplicate_without_id(n: Notification, at: dt.datetime, copies: list[Copy],
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


