"""Analysts' views: workitem_state_durations, request_outcome_summary, capability_timeline.

The SQL differs per engine only where the engines spell time arithmetic differently; the
results are identical (a test compares them).  Seconds are computed from whole microseconds and
divided once, so both engines return the same double for the same interval.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Seconds between two UTC instants.  SQLite stores 'YYYY-MM-DD HH:MM:SS.ffffff' text; its date
# functions round fractions to milliseconds, so whole seconds and microseconds are read apart.
SECONDS = {
    "sqlite": """((CAST(strftime('%s', substr({b}, 1, 19)) AS INTEGER) - CAST(strftime('%s', substr({a}, 1, 19)) AS INTEGER)) * 1000000
                  + CAST(substr({b}, 21, 6) AS INTEGER) - CAST(substr({a}, 21, 6) AS INTEGER)) / 1000000.0""",
    "postgresql": "CAST(EXTRACT(EPOCH FROM ({b} - {a})) AS double precision)",
}
HOUR = {
    "sqlite": "strftime('%Y-%m-%d %H:00:00', {t})",
    "postgresql": "to_char({t} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:00:00')",
}
REAL = {"sqlite": "REAL", "postgresql": "double precision"}

VIEWS = {
    "workitem_state_durations": """
        SELECT workitem_id, state, entered_seq, entered_at, left_seq, left_at,
               CASE WHEN left_at IS NULL THEN NULL ELSE {seconds} END AS seconds
        FROM (SELECT workitem_id, to_state AS state, seq AS entered_seq, at AS entered_at,
                     LEAD(seq) OVER (PARTITION BY workitem_id ORDER BY seq) AS left_seq,
                     LEAD(at) OVER (PARTITION BY workitem_id ORDER BY seq) AS left_at
              FROM workitem_transitions) AS t""",
    "request_outcome_summary": """
        SELECT source, {hour} AS hour, COUNT(*) AS requests,
               SUM(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END) AS failed,
               CAST(SUM(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END) AS {real}) / COUNT(*) AS failure_rate
        FROM request_outcomes
        GROUP BY source, {hour}""",
    "capability_timeline": """
        SELECT workitem_id, capability, granted_seq, granted_at, revoked_seq, revoked_at,
               CASE WHEN revoked_at IS NULL THEN NULL ELSE {interval} END AS seconds,
               CASE WHEN revoked_seq IS NULL THEN 1 ELSE 0 END AS is_open
        FROM capability_history""",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for name, sql in VIEWS.items():
        body = sql.format(
            seconds=SECONDS[dialect].format(a="entered_at", b="left_at"),
            interval=SECONDS[dialect].format(a="granted_at", b="revoked_at"),
            hour=HOUR[dialect].format(t="first_at"),
            real=REAL[dialect],
        )
        op.execute(f"CREATE VIEW {name} AS {body}")


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW {name}")
