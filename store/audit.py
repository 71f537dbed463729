"""Audit investigations from the log alone: one workitem's full trail, and its state at any moment.

Both replay log rows through the projections' own rules (``store/projections``), so what they
show is what the projections would have held at each seq.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Connection, select

from .log import SNAPSHOT_EVENT, Event, event_from_row
from .notifications import NOTIFICATION, SNAPSHOT, as_text
from .projections.capabilities import CapabilityHistory
from .projections.requests import RequestOutcomes
from .projections.workitems import Workitems
from .reading import select_in
from .schema import event_log

_COLUMNS = (event_log.c.seq, event_log.c.received_at, event_log.c.source, event_log.c.notification_type,
            event_log.c.workitem_id, event_log.c.reference_id, event_log.c.payload, event_log.c.duplicate_of,
            event_log.c.quarantine_reason, event_log.c.kind)


def _rows_about(conn: Connection, workitem_id: str, upto_seq: int | None = None) -> tuple[list, list]:
    """(the trail, the requests' rows), both in seq order.

    The trail: every log row naming the workitem, plus rows of its requests ((source,
    referenceId)) that name no workitem (an Error carrying only a referenceId), plus every
    snapshot (whether one reconciles the workitem is known only by replaying it).  The
    requests' rows: every row of those requests, whatever workitem it names, as
    request_outcomes sees them.
    """
    c = event_log.c
    query = select(*_COLUMNS).order_by(c.seq)
    if upto_seq is not None:
        query = query.where(c.seq <= upto_seq)
    own = list(conn.execute(query.where(c.workitem_id == workitem_id)))
    snapshots = list(conn.execute(query.where(c.kind != NOTIFICATION, c.kind == SNAPSHOT)))
    keys = sorted({(r.source, r.reference_id) for r in own if r.reference_id is not None})
    request_rows = list(select_in(conn, query, [c.source, c.reference_id], keys))
    request_rows.sort(key=lambda r: r.seq)
    trail = sorted(own + snapshots + [r for r in request_rows if r.workitem_id is None], key=lambda r: r.seq)
    return trail, request_rows


def _event(row) -> Event | None:
    """The projectable event of a log row, or None for a duplicate or quarantined row."""
    if row.duplicate_of is not None or row.quarantine_reason is not None:
        return None
    return event_from_row(row, row.payload, row.kind)


def _user_data_changes(before: Any, after: Any) -> dict | None:
    if before == after:
        return None
    before = before if isinstance(before, dict) else {}
    after = after if isinstance(after, dict) else {}
    changes = {
        "added": {k: after[k] for k in after.keys() - before.keys()},
        "changed": {k: [before[k], after[k]] for k in after.keys() & before.keys() if before[k] != after[k]},
        "removed": sorted(before.keys() - after.keys()),
    }
    return {k: v for k, v in changes.items() if v}


def history(conn: Connection, workitem_id: str) -> list[dict]:
    """The audit trail: one entry per log row about the workitem, duplicates and quarantined
    rows included, each with what it changed."""
    rows, request_rows = _rows_about(conn, workitem_id)
    workitems, capabilities = Workitems(complete=True), CapabilityHistory(complete=True)
    requests = RequestOutcomes(complete=True)
    # The outcome of each request is known only after all of its rows: replay them first.
    for row in request_rows:
        event = _event(row)
        if event is not None:
            requests.apply(event)
    trail = []
    for row in rows:
        event = _event(row)
        entry: dict[str, Any] = {
            "seq": row.seq, "received_at": row.received_at, "source": row.source,
            "notification_type": row.notification_type, "reference_id": row.reference_id,
            "status": "projected", "state_from": None, "state_to": None,
            "capabilities_granted": [], "capabilities_revoked": [], "user_data_changes": None,
            "request_outcome": None, "error_code": None, "error_message": None,
        }
        if row.kind == SNAPSHOT:
            if event is None:
                continue  # a quarantined snapshot reconciles nothing
            entry["notification_type"] = SNAPSHOT_EVENT
        if row.duplicate_of is not None:
            entry["status"] = f"duplicate of seq {row.duplicate_of}"
        if row.quarantine_reason is not None:
            entry["status"] = f"quarantined: {row.quarantine_reason}"
        request = requests.state.get((row.source, row.reference_id))
        if request is not None:
            entry["request_outcome"] = request["outcome"]
        if event is not None and (event.workitem_id == workitem_id or row.kind == SNAPSHOT):
            before = dict(workitems.state.get(workitem_id) or {})
            open_before = set(capabilities.state.get(workitem_id, {}))
            workitems.apply(event)
            capabilities.apply(event)
            if row.kind == SNAPSHOT:
                reconciled = event.reconcile or {}  # (the workitems projection filled it in)
                if workitem_id not in reconciled:
                    continue  # the snapshot neither lists nor closes this workitem
                entry["status"] = ("snapshot: listed" if reconciled[workitem_id] is not None
                                   else "snapshot: not listed, closed")
            after = workitems.state[workitem_id]
            open_after = capabilities.state.get(workitem_id, {})
            if after["state"] != before.get("state"):
                entry["state_from"], entry["state_to"] = before.get("state"), after["state"]
            entry["capabilities_granted"] = [cap for cap in open_after if cap not in open_before]
            entry["capabilities_revoked"] = sorted(open_before.difference(open_after))
            entry["user_data_changes"] = _user_data_changes(before.get("user_data"), after["user_data"])
        if event is not None and event.notification_type == "Error":
            data = event.data or {}
            entry["error_code"] = as_text(data.get("errorCode"))
            entry["error_message"] = as_text(data.get("errorMessage"))
        trail.append(entry)
    return trail


def state(conn: Connection, workitem_id: str, *, upto_seq: int | None = None,
          as_of: dt.datetime | None = None) -> dict | None:
    """The workitem's ``workitems`` row as the projection held it, from the log alone, with its
    open capability intervals; None if the workitem was unknown then.

    ``upto_seq``: the log cut at that seq.  ``as_of``: the rows received at or before that
    instant (the same thing when, as with live ingest, rows arrive in time order; for imported
    captures received_at is the original time while seq is the import order).
    """
    workitems, capabilities = Workitems(complete=True), CapabilityHistory(complete=True)
    last_seq = 0
    for row in _rows_about(conn, workitem_id, upto_seq)[0]:
        # Only rows naming the workitem change it (an Error with only a referenceId does not),
        # and snapshots that list or close it.
        if (row.workitem_id != workitem_id and row.kind != SNAPSHOT) or (as_of is not None and row.received_at > as_of):
            continue
        event = _event(row)
        if event is not None:
            workitems.apply(event)
            capabilities.apply(event)
            if row.kind != SNAPSHOT or workitem_id in (event.reconcile or {}):
                last_seq = row.seq
    found = workitems.state.get(workitem_id)
    if found is None:
        return None
    return {**found, "last_applied_seq": last_seq,
            "open_capabilities_since_seq": dict(capabilities.state.get(workitem_id, {}))}
