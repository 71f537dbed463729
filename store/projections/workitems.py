"""``workitems``: the current state of each workitem.  The only writer of that table."""

from __future__ import annotations

from sqlalchemy import select

from ..notifications import ERROR, as_text
from ..schema import workitems
from ..db import insert_rows
from .base import Projection, select_in


def capability_list(value) -> list[str] | None:
    """The capabilities of a workitem resource, in received order without repeats.

    None when the value is not a list: such a value is treated as if the key were absent.
    """
    if not isinstance(value, list):
        return None
    if all(type(item) is str and item for item in value):  # the usual case, 3x faster
        return list(dict.fromkeys(value))
    return list(dict.fromkeys(text for text in map(as_text, value) if text is not None))


class Workitems(Projection):
    name = "workitems"
    version = 1
    table = workitems

    def __init__(self, *, complete: bool = False):
        super().__init__(complete=complete)
        self.dirty: set[str] = set()

    def key(self, event):
        return event.workitem_id

    def load(self, conn, keys):
        for row in select_in(conn, select(workitems), [workitems.c.workitem_id], keys):
            self.state[row.workitem_id] = dict(row._mapping)

    def apply(self, event):
        wid = event.workitem_id
        if wid is None:
            return
        row = self.state.get(wid)
        if row is None:
            row = self.state[wid] = {
                "workitem_id": wid, "state": None, "workitem_type": None, "uri": None,
                "capabilities": None, "user_data": None, "first_seq": event.seq,
                "first_seen_at": event.received_at, "notification_count": 0, "error_count": 0,
            }
        row["last_seq"] = event.seq
        row["last_seen_at"] = event.received_at
        row["notification_count"] += 1
        if event.notification_type == ERROR:
            row["error_count"] += 1
        else:
            workitem = event.workitem
            for key, column in (("state", "state"), ("workitemType", "workitem_type"), ("uri", "uri")):
                value = as_text(workitem.get(key))
                if value is not None:
                    row[column] = value
            capabilities = capability_list(workitem.get("capabilities"))
            if capabilities is not None:
                row["capabilities"] = capabilities
            if workitem.get("userData") is not None:
                row["user_data"] = workitem["userData"]
        self.dirty.add(wid)

    def flush(self, conn, final):
        if not final:
            return
        # A complete run started from an empty table: plain inserts, no conflict to resolve.
        insert_rows(conn, workitems, [self.state[wid] for wid in sorted(self.dirty)], replace=not self.complete)
        self.dirty.clear()

    def rows(self):
        return list(self.state.values())
