"""What every projection is: state for the keys it has seen, rules to apply, rows to write."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

from sqlalchemy import Connection, Table

from ..log import SNAPSHOT_EVENT, Event


class Projection(ABC):
    """Base of the four projections.

    ``state`` caches, per key, what the rules need to apply the next event.  ``complete`` means
    the cache holds every key (a rebuild, or an in-memory reconstruction): nothing is loaded from
    the table then.  ``flush`` writes what changed since the last flush; ``rows`` is every row of
    a complete in-memory run that never flushed.

    Snapshots (events with ``notification_type`` "Snapshot") are decided once, by the workitems
    projection, which fills ``event.reconcile`` ({workitem_id: the listed resource, or None for a
    workitem the snapshot closes}); the other projections apply that decision.  So the workitems
    projection must see each list of events first (``PROJECTIONS`` order; runner and audit
    replay them in that order).
    """

    name: ClassVar[str]
    version: ClassVar[int]
    table: ClassVar[Table]

    def __init__(self, *, complete: bool = False):
        self.complete = complete
        self.state: dict[Any, Any] = {}
        self.errors: list[dict] = []  # rows for projection_errors: events this projection skipped
        self.created = 0  # rows this instance added to its table (projection_checkpoints.rows)

    @abstractmethod
    def key(self, event: Event) -> Any | None:
        """The state key a notification touches, or None when the projection ignores it."""

    def keys(self, event: Event) -> Iterable:
        """The state keys an event touches: a snapshot touches the workitems it reconciles."""
        if event.notification_type == SNAPSHOT_EVENT:
            return event.reconcile or ()
        key = self.key(event)
        return () if key is None else (key,)

    @abstractmethod
    def load(self, conn: Connection, keys: set) -> None:
        """Put the table's current state for ``keys`` (none of them cached yet) into ``state``."""

    @abstractmethod
    def apply(self, event: Event) -> None:
        """Apply one event (whose ``data`` is readable) to ``state``, noting what to write."""

    @abstractmethod
    def flush(self, conn: Connection, final: bool) -> None:
        """Write what changed.  Not ``final``: rows that later events may still change can wait
        (each is then written once, not once per chunk); ``final``: write everything."""

    @abstractmethod
    def rows(self) -> list[dict]:
        """Every row of a complete in-memory run that never flushed."""

    def apply_all(self, conn: Connection | None, events: list[Event]) -> None:
        """Load missing state (unless complete), then apply ``events`` in order."""
        if not self.complete:
            missing = {k for event in events for k in self.keys(event) if k not in self.state}
            if missing:
                if conn is None:
                    raise ValueError(f"{self.name}: an incremental run reads its state from a connection")
                self.load(conn, missing)
        for event in events:
            if event.data is None:
                self._skip(event, "the payload is not a readable message (changed after it was classified?)")
                continue
            try:
                self.apply(event)
            except Exception as exc:  # noqa: BLE001 - one row must never stop a projection
                self._skip(event, f"{type(exc).__name__}: {exc}"[:500])

    def _skip(self, event: Event, error: str) -> None:
        """Record an event this projection cannot apply; projecting goes on (RULES.md 6.1)."""
        self.errors.append({"projection": self.name, "seq": event.seq, "error": error})
