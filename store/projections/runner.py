"""Running the projections: incremental catch-up, rebuild, in-memory reconstruction.

The only writer of ``projection_checkpoints``.  Each projection's checkpoint is written in the
same transaction as the rows it describes, so a crash never leaves a table ahead of or behind
its checkpoint, and running again is always safe.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, delete, func, select

from .. import log
from ..bulk import collections_postponed, insert_rows
from ..db import write_transaction
from ..locks import lock_checkpoints
from ..schema import projection_checkpoints as checkpoints
from ..schema import projection_errors
from . import PROJECTIONS
from .base import Projection

Progress = Callable[[int, int], None]  # (seq reached, head seq)
STEP_EVENTS = 20_000  # log rows applied with one fresh state (what memory holds at most)
TRANSACTION_EVENTS = 100_000  # log rows applied per transaction of `project` (a commit per step
# cost a quarter of a 5M catch-up: pages written again at every checkpoint)


@dataclass(frozen=True)
class ProjectResult:
    applied: int  # projectable events applied
    from_seq: int
    to_seq: int
    rebuilt: tuple[str, ...] = ()  # projections rebuilt because their version changed
    errors: int = 0  # rows in projection_errors: log rows a projection skipped (all runs)


def _lock_checkpoints(conn: Connection) -> dict[str, tuple[int, int]]:
    """Read checkpoints (name -> (last_seq, version)) with the projectors' lock held."""
    lock_checkpoints(conn)
    rows = conn.execute(select(checkpoints.c.projection, checkpoints.c.last_seq, checkpoints.c.version))
    return {name: (last_seq, version) for name, last_seq, version in rows}


def _save_checkpoints(conn: Connection, projections: Sequence[Projection], seq: int,
                      rows: dict[str, int] | None = None) -> None:
    """Each projection's checkpoint: ``seq``, its version and its table's row count (``rows``
    before this step, default 0, plus what the step added)."""
    now = dt.datetime.now(dt.UTC)
    insert_rows(conn, checkpoints, [
        {"projection": p.name, "last_seq": seq, "version": p.version, "updated_at": now,
         "rows": (rows or {}).get(p.name, 0) + p.created}
        for p in projections
    ], replace=True)


def _run(conn: Connection, projections: Sequence[Projection], after_seq: int, upto_seq: int,
         progress: Progress | None, head_seq: int, source: Connection | None = None) -> int:
    """Apply the log rows after_seq < seq <= upto_seq (read from ``source``, default ``conn``)
    to ``projections``, writing to ``conn``; return the events applied."""
    applied = 0
    with collections_postponed():
        for events in log.read_events(source or conn, after_seq, upto_seq):
            for p in projections:
                p.apply_all(conn, events)
                p.flush(conn, final=False)
            applied += len(events)
            if progress:
                progress(events[-1].seq, head_seq)
        for p in projections:
            p.flush(conn, final=True)
            insert_rows(conn, projection_errors, p.errors)
    return applied


def _step(conn: Connection, after: int, upto: int, progress: Progress | None, head_seq: int,
          source: Connection | None = None) -> int:
    """Bring every projection from ``after`` to ``upto`` (their checkpoints included) with fresh
    state: memory holds one step's keys, whatever the size of the log.  ``after`` 0 means the
    tables are empty (the state then needs no loads)."""
    projections = [cls(complete=after == 0) for cls in PROJECTIONS]
    rows = {} if after == 0 else dict(conn.execute(select(checkpoints.c.projection, checkpoints.c.rows)).all())
    applied = _run(conn, projections, after, upto, progress, head_seq, source)
    _save_checkpoints(conn, projections, upto, rows)
    return applied


def _reset(conn: Connection) -> None:
    for cls in PROJECTIONS:
        conn.execute(delete(cls.table))
    conn.execute(delete(projection_errors))


def project(engine: Engine, progress: Progress | None = None) -> ProjectResult:
    """Apply every log row past the projections' checkpoint; idempotent.

    One transaction per TRANSACTION_EVENTS log rows, in steps of STEP_EVENTS, each with its
    checkpoint.  When a
    projection's stored version differs from the code's (or the checkpoints disagree), every
    projection is recomputed from seq 1, together: the workitems projection decides what each
    snapshot changes for the others (projections/base.py), so they must advance in step.
    """
    applied, start = 0, None
    rebuilt: tuple[str, ...] = ()
    while True:
        with write_transaction(engine) as conn:
            stored = _lock_checkpoints(conn)
            head_seq = log.head(conn)[0]
            points = [stored.get(cls.name, (0, cls.version)) for cls in PROJECTIONS]
            if len({seq for seq, _ in points}) > 1 or any(
                    version != cls.version for (_, version), cls in zip(points, PROJECTIONS, strict=True)):
                rebuilt = tuple(cls.name for cls in PROJECTIONS)
                _reset(conn)
                after = 0
            else:
                after = points[0][0]
            start = after if start is None else start
            if after >= head_seq:
                if rebuilt and after == 0:
                    _save_checkpoints(conn, [cls() for cls in PROJECTIONS], 0)
                return ProjectResult(applied, start, after, rebuilt, error_count(conn))
            applied += replay(conn, after, min(head_seq, after + TRANSACTION_EVENTS), progress, head_seq)


def rebuild(engine: Engine, progress: Progress | None = None) -> ProjectResult:
    """Recompute every projection from seq 1, in one transaction (readers see old or new), in
    steps of STEP_EVENTS log rows (memory does not grow with the log)."""
    with write_transaction(engine) as conn:
        _lock_checkpoints(conn)
        head_seq = log.head(conn)[0]
        _reset(conn)
        applied = replay(conn, 0, head_seq, progress)
        errors = error_count(conn)
    return ProjectResult(applied, 0, head_seq, tuple(cls.name for cls in PROJECTIONS), errors)


def replay(conn: Connection, after: int, upto: int, progress: Progress | None = None,
           head_seq: int | None = None, source: Connection | None = None) -> int:
    """Apply the log rows after < seq <= upto of ``source`` (default ``conn``) to the projection
    tables of ``conn``, whose checkpoints are at ``after``, in steps; return the events applied.
    ``head_seq`` (default ``upto``) is what progress reports as the end.  (verify replays a
    store's log into a scratch store this way.)"""
    applied = 0
    for step in range(after, upto, STEP_EVENTS):
        applied += _step(conn, step, min(upto, step + STEP_EVENTS), progress, head_seq or upto, source)
    if after == upto == 0:  # an empty log: checkpoints at 0 all the same
        _save_checkpoints(conn, [cls() for cls in PROJECTIONS], 0)
    return applied


def error_count(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(projection_errors)).scalar_one()


def compute(conn: Connection, upto_seq: int | None = None) -> dict[str, list[dict]]:
    """Every projection's rows computed in memory from the log (cut at ``upto_seq``)."""
    projections = [cls(complete=True) for cls in PROJECTIONS]
    for events in log.read_events(conn, 0, upto_seq):
        for p in projections:
            p.apply_all(None, events)
    return {p.table.name: p.rows() for p in projections}
