"""What is in a store: row counts, checkpoints and their lag, quarantine and duplicates, chain head."""

from __future__ import annotations

from sqlalchemy import Connection, func, select

from . import log
from .notifications import KINDS
from .projections import PROJECTIONS
from .schema import PROJECTION_TABLES, event_log, imported_files, projection_checkpoints, projection_errors


def status(conn: Connection) -> dict:
    c = event_log.c
    head_seq, head_hash = log.head(conn)
    counts = conn.execute(select(
        func.count(),
        func.count(c.duplicate_of),
        func.count(c.quarantine_reason),
    )).one()
    kinds = dict(conn.execute(select(c.kind, func.count()).group_by(c.kind)).all())
    reasons = conn.execute(
        select(c.quarantine_reason, func.count()).where(c.quarantine_reason.is_not(None))
        .group_by(c.quarantine_reason).order_by(func.count().desc()).limit(10)
    ).all()
    stored = {r.projection: r for r in conn.execute(select(projection_checkpoints))}
    checkpoints = []
    for cls in PROJECTIONS:
        r = stored.get(cls.name)
        last_seq = r.last_seq if r else 0
        checkpoints.append({
            "projection": cls.name, "last_seq": last_seq, "lag": head_seq - last_seq,
            "version": r.version if r else None, "code_version": cls.version,
            "updated_at": r.updated_at.isoformat() if r else None,
        })
    tables = {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
              for t in (event_log, imported_files, *PROJECTION_TABLES, projection_errors)}
    errors = conn.execute(select(projection_errors).order_by(projection_errors.c.seq).limit(10)).all()
    return {
        "event_log": {"rows": counts[0], "duplicates": counts[1], "quarantined": counts[2],
                      "kinds": {kind: kinds.get(kind, 0) for kind in KINDS},
                      "head_seq": head_seq, "chain_head": head_hash,
                      "quarantine_reasons": {reason: n for reason, n in reasons}},
        "tables": tables,
        "checkpoints": checkpoints,
        # The first log rows a projection skipped (all of them: table projection_errors).
        "projection_errors": [{"projection": r.projection, "seq": r.seq, "error": r.error} for r in errors],
    }
