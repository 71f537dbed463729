"""``capability_history``: one row per unbroken interval in which a workitem had a capability.

The only writer of that table.
"""

from __future__ import annotations

from sqlalchemy import bindparam, select

from ..bulk import insert_rows
from ..log import SNAPSHOT_EVENT
from ..notifications import ERROR
from ..reading import select_in
from ..schema import capability_history as history
from .base import Projection
from .workitems import capability_list


class CapabilityHistory(Projection):
    name = "capability_history"
    version = 3
    table = history

    def __init__(self, *, complete: bool = False):
        super().__init__(complete=complete)
        # state: workitem_id -> {capability: granted_seq} of the intervals still open
        self.inserts: dict[tuple, dict] = {}  # new intervals, by (workitem, capability, granted_seq)
        self.closes: list[dict] = []  # intervals already in the table that closed

    def key(self, event):
        return event.workitem_id

    def load(self, conn, keys):
        query = select(history.c.workitem_id, history.c.capability, history.c.granted_seq).where(
            history.c.revoked_seq.is_(None)
        )
        for wid in keys:
            self.state[wid] = {}
        for wid, capability, granted_seq in select_in(conn, query, [history.c.workitem_id], keys):
            self.state[wid][capability] = granted_seq

    def apply(self, event):
        if event.notification_type == SNAPSHOT_EVENT:
            for wid, resource in event.reconcile.items():
                self._set(event, wid, [] if resource is None else capability_list(resource.get("capabilities")))
        elif event.workitem_id is not None and event.notification_type != ERROR:
            self._set(event, event.workitem_id, capability_list(event.workitem.get("capabilities")))

    def _set(self, event, wid: str, now: list[str] | None) -> None:
        if now is None:
            return
        open_ = self.state.setdefault(wid, {})
        if len(now) == len(open_) and all(capability in open_ for capability in now):
            return  # the same capabilities again (the usual PropertiesUpdated)
        for capability in now:
            if capability not in open_:
                open_[capability] = event.seq
                self.created += 1
                self.inserts[(wid, capability, event.seq)] = {
                    "workitem_id": wid, "capability": capability, "granted_seq": event.seq,
                    "granted_at": event.received_at, "revoked_seq": None, "revoked_at": None,
                }
        for capability in set(open_).difference(now):
            granted_seq = open_.pop(capability)
            row = self.inserts.get((wid, capability, granted_seq))
            if row is not None:
                row.update(revoked_seq=event.seq, revoked_at=event.received_at)
            else:
                self.closes.append({"k_workitem_id": wid, "k_capability": capability,
                                    "k_granted_seq": granted_seq, "k_revoked_seq": event.seq,
                                    "k_revoked_at": event.received_at})

    def flush(self, conn, final):
        if final:
            rows, self.inserts = list(self.inserts.values()), {}
        else:  # open intervals may still close: insert them closed, not insert then update
            rows = [row for row in self.inserts.values() if row["revoked_seq"] is not None]
            self.inserts = {key: row for key, row in self.inserts.items() if row["revoked_seq"] is None}
        insert_rows(conn, history, rows)
        if self.closes:
            conn.execute(
                history.update()
                .where(history.c.workitem_id == bindparam("k_workitem_id"),
                       history.c.capability == bindparam("k_capability"),
                       history.c.granted_seq == bindparam("k_granted_seq"))
                .values(revoked_seq=bindparam("k_revoked_seq"),
                        revoked_at=bindparam("k_revoked_at", type_=history.c.revoked_at.type)),
                self.closes,
            )
            self.closes = []

    def rows(self):
        return list(self.inserts.values())
