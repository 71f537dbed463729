"""What is in a store: row counts, checkpoints and their lag, quarantine and duplicates, chain head."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import Connection, func, select

from . import log
from .notifications import KINDS, utc_text
from .projections import PROJECTIONS
from .schema import imported_files, projection_checkpoints, projection_errors, seals


def status(conn: Connection) -> dict:
    head_seq, head_hash = log.head(conn)
    # From the counts kept with each append (event_log_counts), not a scan of the log.
    kinds: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    duplicates = 0
    for kind, reason, duplicate, n in log.counts(conn):
        kinds[kind] += n
        duplicates += n if duplicate else 0
        if reason is not None:
            reasons[reason] += n
    stored = {r.projection: r for r in conn.execute(select(projection_checkpoints))}
    checkpoints = []
    for cls in PROJECTIONS:
        r = stored.get(cls.name)
        last_seq = r.last_seq if r else 0
        checkpoints.append({
            "projection": cls.name, "last_seq": last_seq, "lag": head_seq - last_seq,
            "version": r.version if r else None, "code_version": cls.version,
            "updated_at": utc_text(r.updated_at) if r else None,
        })
    # The projections' row counts are kept in their checkpoints; the other two tables are small.
    tables = {"event_log": sum(kinds.values()),
              "imported_files": conn.execute(select(func.count()).select_from(imported_files)).scalar_one(),
              **{cls.table.name: stored[cls.name].rows if cls.name in stored else 0 for cls in PROJECTIONS},
              "projection_errors": conn.execute(select(func.count()).select_from(projection_errors)).scalar_one()}
    errors = conn.execute(select(projection_errors).order_by(projection_errors.c.seq).limit(10)).all()
    f = imported_files.c
    incomplete = conn.execute(select(f.file_name, f.sha256, f.rows, f.first_seq, f.last_seq, f.resume_offset)
                              .where(f.complete.is_(False)).order_by(f.id)).all()
    last_seal = conn.execute(select(seals.c.n, seals.c.seq, seals.c.sealed_at, seals.c.witnessed)
                             .order_by(seals.c.n.desc()).limit(1)).first()
    return {
        # The newest seal (store/seals.py) and the log rows appended since: what no seal covers yet.
        "last_seal": None if last_seal is None else {**last_seal._mapping, "rows_since": head_seq - last_seal.seq},
        "event_log": {"rows": sum(kinds.values()), "duplicates": duplicates, "quarantined": reasons.total(),
                      "kinds": {kind: kinds.get(kind, 0) for kind in KINDS},
                      "head_seq": head_seq, "chain_head": head_hash,
                      "quarantine_reasons": dict(reasons.most_common(10))},
        "tables": tables,
        "checkpoints": checkpoints,
        # Files imported in steps whose last step never committed (import them again to resume).
        "incomplete_imports": [dict(r._mapping) for r in incomplete],
        # The first log rows a projection skipped (all of them: table projection_errors).
        "projection_errors": [{"projection": r.projection, "seq": r.seq, "error": r.error} for r in errors],
    }
