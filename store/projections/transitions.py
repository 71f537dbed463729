"""``workitem_transitions``: one row each time a workitem's state differs from its previous one
(``notification_type`` "Snapshot" when a snapshot, not a notification, showed the new state).

The only writer of that table.
"""

from __future__ import annotations

from sqlalchemy import func, select

from ..bulk import insert_rows
from ..log import SNAPSHOT_EVENT
from ..notifications import ERROR, as_text
from ..reading import select_in
from ..schema import workitem_transitions as transitions
from .base import Projection
from .workitems import ABSENT


class WorkitemTransitions(Projection):
    name = "workitem_transitions"
    version = 2
    table = transitions

    def __init__(self, *, complete: bool = False):
        super().__init__(complete=complete)
        self.pending: list[dict] = []

    def key(self, event):
        return event.workitem_id

    def load(self, conn, keys):
        # The state now is the to_state of each workitem's latest transition (one index seek
        # per workitem: the subquery reads the last (workitem_id, seq) entry of the key).
        other = transitions.alias()
        latest = select(func.max(other.c.seq)).where(other.c.workitem_id == transitions.c.workitem_id)
        query = select(transitions.c.workitem_id, transitions.c.to_state).where(
            transitions.c.seq == latest.scalar_subquery())
        for wid, state in select_in(conn, query, [transitions.c.workitem_id], keys):
            self.state[wid] = state
        for wid in keys:
            self.state.setdefault(wid, None)

    def apply(self, event):
        if event.notification_type == SNAPSHOT_EVENT:
            for wid, resource in event.reconcile.items():
                self._change(event, wid, ABSENT if resource is None else as_text(resource.get("state")))
        elif event.workitem_id is not None and event.notification_type != ERROR:
            self._change(event, event.workitem_id, as_text(event.workitem.get("state")))

    def _change(self, event, wid: str, new: str | None) -> None:
        old = self.state.get(wid)
        if new is None or new == old:
            return
        self.state[wid] = new
        self.created += 1
        self.pending.append({
            "workitem_id": wid, "seq": event.seq, "at": event.received_at,
            "from_state": old, "to_state": new, "notification_type": event.notification_type,
            "source": event.source, "reference_id": event.reference_id,
        })

    def flush(self, conn, final):
        if self.pending:
            insert_rows(conn, transitions, self.pending)
        self.pending = []

    def rows(self):
        return list(self.pending)
