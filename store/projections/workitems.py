"""``workitems``: the current state of each workitem.  The only writer of that table.

It also decides what a snapshot (the agent's workitems read after a handshake, docs/RULES.md
section 5.5) changes, for every projection: ``event.reconcile`` maps each workitem the snapshot
reconciles to its listed resource, or to None when the snapshot closes it (open in the store,
held by the snapshot's source, not listed).
"""

from __future__ import annotations

import json

from sqlalchemy import Connection, and_, bindparam, func, or_, select, update

from ..bulk import insert_rows
from ..log import MAX_JSON_BYTES, PROJECTABLE, SNAPSHOT_EVENT
from ..notifications import ERROR, MAX_KEY_BYTES, NOTIFICATION, SNAPSHOT, as_text, snapshot_workitems, too_long
from ..reading import pages, select_in
from ..schema import event_log, projection_checkpoints, workitems
from ..strict_json import load_json
from .base import Projection

# The state of a workitem that was open in the store, held by a source, and absent from that
# source's snapshot: it ended (completed, rejected, revoked, transferred) while nobody listened.
ABSENT = "Absent"
CLOSED_STATES = ("Completed", "Revoked", ABSENT)
SHORT = MAX_KEY_BYTES // 4  # characters that cannot be more than MAX_KEY_BYTES bytes
MAX_CAPABILITIES = 10_000  # a longer list is not a capabilities list (docs/RULES.md 5.1)


def capability_list(value) -> list[str] | None:
    """The capabilities of a workitem resource, in received order without repeats.

    None when the value is not a list, or a list of more than MAX_CAPABILITIES entries: such a
    value is treated as if the key were absent.
    Entries are taken as text (section 1.1 of docs/RULES.md); null, "" and names longer than
    MAX_KEY_BYTES (too long to index in capability_history) are left out.
    """
    if not isinstance(value, list) or len(value) > MAX_CAPABILITIES:
        return None
    if all(type(item) is str and item and len(item) <= SHORT for item in value):  # the usual case, 3x faster
        return list(dict.fromkeys(value))
    return list(dict.fromkeys(text for text in map(as_text, value) if text is not None and not too_long(text)))


def is_open(state: str | None) -> bool:
    return state not in CLOSED_STATES


class Workitems(Projection):
    name = "workitems"
    version = 3
    table = workitems

    def __init__(self, *, complete: bool = False):
        super().__init__(complete=complete)
        self.dirty: set[str] = set()
        self.held: dict[str, set[str]] = {}  # source -> its open workitems (of those in state)
        self._holder: dict[str, str] = {}  # open workitem -> the source in ``held`` that has it
        self._sources_loaded: set[str] = set()  # incremental: sources whose open workitems are all in state

    def key(self, event):
        return event.workitem_id

    def keys(self, event):
        if event.notification_type == SNAPSHOT_EVENT:
            return snapshot_workitems(event.data).keys()
        return super().keys(event)

    def apply_all(self, conn, events):
        if not self.complete:
            # A snapshot closes open workitems of its source that it does not list: all of them
            # must be in state before it is applied.
            sources = {e.source for e in events if e.notification_type == SNAPSHOT_EVENT} - self._sources_loaded
            for source in sources:
                still_open = or_(workitems.c.state.is_(None), workitems.c.state.not_in(CLOSED_STATES))
                query = select(workitems).where(workitems.c.source == source, still_open)
                self._cache(row for row in conn.execute(query) if row.workitem_id not in self.state)
            self._sources_loaded |= sources
        super().apply_all(conn, events)

    def load(self, conn, keys):
        self._cache(select_in(conn, select(workitems), [workitems.c.workitem_id], keys))

    def _cache(self, rows) -> None:
        for row in rows:
            self.state[row.workitem_id] = dict(row._mapping)
            self._track(self.state[row.workitem_id])

    def _track(self, row: dict) -> None:
        wid = row["workitem_id"]
        new = row["source"] if is_open(row["state"]) else None
        old = self._holder.get(wid)
        if new == old:
            return  # the usual case: nothing moved
        if old is not None:
            del self._holder[wid]
            self.held[old].discard(wid)
        if new is not None:
            self._holder[wid] = new
            self.held.setdefault(new, set()).add(wid)

    def _row(self, event, wid: str) -> dict:
        row = self.state.get(wid)
        if row is None:  # (state holds every row of the table about the keys seen: this one is new)
            self.created += 1
            row = self.state[wid] = {
                "workitem_id": wid, "state": None, "workitem_type": None, "uri": None,
                "capabilities": None, "user_data": None, "first_seq": event.seq,
                "first_seen_at": event.received_at, "notification_count": 0, "error_count": 0,
                "source": None,
            }
        row["last_seq"] = event.seq
        row["last_seen_at"] = event.received_at
        self.dirty.add(wid)
        return row

    def apply(self, event):
        if event.notification_type == SNAPSHOT_EVENT:
            self._apply_snapshot(event)
            return
        wid = event.workitem_id
        if wid is None:
            return
        row = self._row(event, wid)
        row["notification_count"] += 1
        if event.notification_type == ERROR:
            row["error_count"] += 1
        else:
            _observe(row, event.workitem, event)
            self._track(row)

    def _apply_snapshot(self, event) -> None:
        listed = snapshot_workitems(event.data)
        for wid, resource in listed.items():
            _observe(self._row(event, wid), resource, event)
            self._track(self.state[wid])
            event.reconcile[wid] = resource
        for wid in sorted(self.held.get(event.source, set()) - listed.keys()):
            row = self._row(event, wid)
            row["state"], row["capabilities"] = ABSENT, []
            self._track(row)
            event.reconcile[wid] = None

    def flush(self, conn, final):
        if not final:
            return
        # A complete run started from an empty table: plain inserts, no conflict to resolve.
        insert_rows(conn, workitems, [self.state[wid] for wid in sorted(self.dirty)], replace=not self.complete)
        self.dirty.clear()

    def rows(self):
        return list(self.state.values())


def _observe(row: dict, workitem: dict, event) -> None:
    """A StatusChange, PropertiesUpdated or a snapshot's resource (of ``event``): the fields it
    carries replace the row's; the workitem is now held by the event's source."""
    for key, column in (("state", "state"), ("workitemType", "workitem_type"), ("uri", "uri")):
        value = as_text(workitem.get(key))
        if value is not None:
            row[column] = value
    capabilities = capability_list(workitem.get("capabilities"))
    if capabilities is not None:
        row["capabilities"] = capabilities
    if workitem.get("userData") is not None:
        row["user_data"] = _bounded(workitem["userData"], event.seq) if event.large else workitem["userData"]
    row["source"] = event.source


def _bounded(value, seq: int):
    """``value`` (of the log row ``seq``), or its degraded form when its JSON text is over
    MAX_JSON_BYTES (too large for jsonb; the same on both engines, so that both stores stay
    identical)."""
    size = len(json.dumps(value))
    return value if size <= MAX_JSON_BYTES else {"$too_large": {"bytes": size, "seq": seq}}


def refresh_user_data(conn: Connection, changed_from: dict[str, int]) -> list[str]:
    """Recompute ``user_data`` of workitems from the log as it is now, after a redaction
    (store/redaction.py) of rows of each workitem at or after seq ``changed_from[workitem]``,
    exactly as a rebuild up to the projection's checkpoint would: the userData of the last
    projectable event carrying a non-null one for the workitem (a notification of it other than
    Error, or a snapshot listing it), through ``_bounded``.  Only that event can have changed
    the value, and only if it is at or after ``changed_from``: the log before is not read, nor
    other workitems.  Returns the workitems whose row changed."""
    checkpoint = conn.execute(select(projection_checkpoints.c.last_seq)
                              .where(projection_checkpoints.c.projection == Workitems.name)).scalar()
    w, c = workitems.c, event_log.c
    stored = {r.workitem_id: r for r in select_in(conn, select(w.workitem_id, w.user_data, w.last_seq),
                                                  [w.workitem_id], sorted(changed_from))}
    if not checkpoint or not stored:
        return []
    low = min(changed_from[wid] for wid in stored) - 1
    found: dict[str, tuple[int, object]] = {}  # workitem -> (seq, the user_data that event sets)
    # Notifications: the last one of each workitem whose text may hold a userData (the text test
    # in SQL: cheap), and only where that one has none, every one.
    notifications = and_(PROJECTABLE, c.kind == NOTIFICATION, c.notification_type != ERROR, c.seq > low,
                         c.seq <= checkpoint)
    may_hold = or_(c.payload.contains('"userData"'), c.payload.contains("\\", autoescape=True))
    last = select(func.max(c.seq)).where(notifications, may_hold).group_by(c.workitem_id)
    seqs = [seq for (seq,) in select_in(conn, last, [c.workitem_id], list(stored))]
    query = select(c.seq, c.workitem_id, c.payload)
    missed = _notifications_user_data(select_in(conn, query, [c.seq], seqs), changed_from, found)
    _notifications_user_data(select_in(conn, query.where(notifications), [c.workitem_id], sorted(missed)),
                             changed_from, found)
    high = min(checkpoint, max(r.last_seq for r in stored.values()))
    for rows in pages(conn, select(c.seq, c.payload).where(PROJECTABLE, c.kind == SNAPSHOT), low, high):
        for seq, payload in rows:
            message = _message(payload, SNAPSHOT)
            for wid, resource in (snapshot_workitems(message) if message is not None else {}).items():
                if wid in stored and seq >= changed_from[wid] and resource.get("userData") is not None \
                        and seq > found.get(wid, (0,))[0]:
                    found[wid] = (seq, _user_data_of(resource, seq, payload))
    changed = [wid for wid, (_, value) in found.items() if value != stored[wid].user_data]
    if changed:
        conn.execute(update(workitems).where(w.workitem_id == bindparam("wid")).values(user_data=bindparam("value")),
                     [{"wid": wid, "value": found[wid][1]} for wid in changed])
    return changed


def _notifications_user_data(rows, changed_from: dict[str, int], found: dict[str, tuple[int, object]]) -> set[str]:
    """Put in ``found`` the user_data that the notifications ``rows`` (seq, workitem, payload)
    at or after ``changed_from`` set, the last one winning; the workitems of rows that set none."""
    missed = set()
    for seq, wid, payload in rows:
        if seq < changed_from[wid]:
            continue
        message = _message(payload, NOTIFICATION)
        workitem = message["data"].get("workitem") if message is not None else None
        if not isinstance(workitem, dict) or workitem.get("userData") is None:
            missed.add(wid)
        elif seq > found.get(wid, (0,))[0]:
            found[wid] = (seq, _user_data_of(workitem, seq, payload))
    return missed


def _message(payload: str, kind: str) -> dict | None:
    """A projectable row's payload as ``log.event_from_row`` reads it (a notification's with
    its ``data`` object); None when it cannot be read so (a projection skips the row)."""
    try:
        message = load_json(payload)
    except ValueError:
        return None
    if not isinstance(message, dict) or (kind == NOTIFICATION and not isinstance(message.get("data"), dict)):
        return None
    return message


def _user_data_of(workitem: dict, seq: int, payload: str):
    """``user_data`` as ``_observe`` sets it from ``workitem`` (of the log row ``seq``)."""
    return _bounded(workitem["userData"], seq) if len(payload) > MAX_JSON_BYTES else workitem["userData"]
