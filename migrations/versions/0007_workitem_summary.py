"""The view workitem_summary: one row per workitem with the answers analysts ask most.

First seen, first invited, accepted, completed, final state, rejections, transfers and
revocations, time to accept and handling time, from the projections ``workitems`` and
``workitem_transitions``.  "Rejected", "transferred" and "revoked" are the transitions that
docs/SQL.md ("Rejected, transferred, revoked") defines; this view is their one implementation.

As in 0002, the engines differ only in how they spell time arithmetic, and the results are
identical: durations are whole microseconds (integers, summed exactly) divided once.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Microseconds between two UTC instants, as an integer.  SQLite stores the fixed-width text
# 'YYYY-MM-DD HH:MM:SS.ffffff' and its date functions keep only milliseconds, so whole seconds
# and the six fractional digits are read apart.  PostgreSQL's EXTRACT(EPOCH ...) is numeric.
MICROS = {
    "sqlite": """((CAST(strftime('%s', substr({b}, 1, 19)) AS INTEGER)
                   - CAST(strftime('%s', substr({a}, 1, 19)) AS INTEGER)) * 1000000
                  + CAST(substr({b}, 21, 6) AS INTEGER) - CAST(substr({a}, 21, 6) AS INTEGER))""",
    "postgresql": "CAST(EXTRACT(EPOCH FROM ({b} - {a})) * 1000000 AS bigint)",
}
REAL = {"sqlite": "REAL", "postgresql": "double precision"}

# Rejected: Invited -> Completed (GWS reports a Reject as "Status changed to Completed").
# Transferred: Processing -> Revoked.  Revoked: any change to Revoked.  `rejected` is a
# comparison: boolean on PostgreSQL, 1/0 on SQLite (as the BOOLEAN columns of the tables).
WORKITEM_SUMMARY = """
SELECT w.workitem_id, w.state AS final_state, w.source,
       w.first_seen_at, t.invited_at, t.accepted_at, t.completed_at, w.last_seen_at,
       COALESCE(t.rejections, 0) > 0 AS rejected,
       COALESCE(t.rejections, 0) AS rejections,
       COALESCE(t.transfers, 0) AS transfers,
       COALESCE(t.revocations, 0) AS revocations,
       CASE WHEN t.invited_at IS NULL OR t.accepted_at IS NULL THEN NULL
            ELSE CAST({accept_micros} AS {real}) / 1000000 END AS time_to_accept_seconds,
       CAST(t.processing_micros AS {real}) / 1000000 AS handling_seconds,
       w.notification_count, w.error_count
FROM workitems w
LEFT JOIN (
  SELECT workitem_id,
         MIN(CASE WHEN to_state = 'Invited' THEN at END) AS invited_at,
         MIN(CASE WHEN from_state = 'Invited' AND to_state = 'Processing' THEN at END) AS accepted_at,
         MAX(CASE WHEN from_state = 'Processing' AND to_state = 'Completed' THEN at END) AS completed_at,
         SUM(CASE WHEN from_state = 'Invited' AND to_state = 'Completed' THEN 1 ELSE 0 END) AS rejections,
         SUM(CASE WHEN from_state = 'Processing' AND to_state = 'Revoked' THEN 1 ELSE 0 END) AS transfers,
         SUM(CASE WHEN to_state = 'Revoked' THEN 1 ELSE 0 END) AS revocations,
         SUM(CASE WHEN to_state = 'Processing' AND left_at IS NOT NULL THEN {stay_micros} END) AS processing_micros
  FROM (SELECT workitem_id, from_state, to_state, at,
               LEAD(at) OVER (PARTITION BY workitem_id ORDER BY seq) AS left_at
        FROM workitem_transitions) AS s
  GROUP BY workitem_id
) AS t ON t.workitem_id = w.workitem_id"""


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    body = WORKITEM_SUMMARY.format(
        accept_micros=MICROS[dialect].format(a="t.invited_at", b="t.accepted_at"),
        stay_micros=MICROS[dialect].format(a="at", b="left_at"),
        real=REAL[dialect],
    )
    op.execute(f"CREATE VIEW workitem_summary AS {body}")


def downgrade() -> None:
    op.execute("DROP VIEW workitem_summary")
