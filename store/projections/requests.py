"""``request_outcomes``: what became of each request, correlated on (source, referenceId).

The only writer of that table.
"""

from __future__ import annotations

from sqlalchemy import select

from ..bulk import insert_rows
from ..notifications import ERROR, as_text
from ..reading import select_in
from ..schema import request_outcomes as outcomes
from .base import Projection


class RequestOutcomes(Projection):
    name = "request_outcomes"
    version = 1
    table = outcomes

    def __init__(self, *, complete: bool = False):
        super().__init__(complete=complete)
        self.dirty: set[tuple[str, str]] = set()

    def key(self, event):
        return None if event.reference_id is None else (event.source, event.reference_id)

    def keys(self, event):
        key = self.key(event)  # a snapshot answers no request
        return () if key is None else (key,)

    def load(self, conn, keys):
        for row in select_in(conn, select(outcomes), [outcomes.c.source, outcomes.c.reference_id], keys):
            self.state[(row.source, row.reference_id)] = dict(row._mapping)

    def apply(self, event):
        key = self.key(event)
        if key is None:
            return
        row = self.state.get(key)
        if row is None:
            self.created += 1
            row = self.state[key] = {
                "source": event.source, "reference_id": event.reference_id, "workitem_id": None,
                "outcome": "succeeded", "error_code": None, "error_message": None,
                "notification_count": 0, "first_seq": event.seq, "first_at": event.received_at,
            }
        row["notification_count"] += 1
        row["last_seq"] = event.seq
        row["last_at"] = event.received_at
        if row["workitem_id"] is None:
            row["workitem_id"] = event.workitem_id
        if event.notification_type == ERROR:
            row["outcome"] = "failed"
            for key_in, column in (("errorCode", "error_code"), ("errorMessage", "error_message")):
                value = as_text(event.data.get(key_in))
                if value is not None:
                    row[column] = value
        self.dirty.add(key)

    def flush(self, conn, final):
        if not final:
            return
        # A complete run started from an empty table: plain inserts, no conflict to resolve.
        insert_rows(conn, outcomes, [self.state[key] for key in sorted(self.dirty)], replace=not self.complete)
        self.dirty.clear()

    def rows(self):
        return list(self.state.values())
