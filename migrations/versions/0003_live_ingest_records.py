"""Live ingest records: event_log.kind and .session, their indexes, workitems.source, the views
notifications and ingest_gaps.

``kind`` tells notifications from the records live ingest adds (session markers, snapshots);
every existing row is a notification.  ``session`` names the live session that received a row.
Both are added with ALTER TABLE ... ADD COLUMN, which neither engine treats as an UPDATE of the
rows (the append-only triggers do not fire) and which SQLite does without rebuilding the table
(a rebuild would drop its triggers).  Existing rows keep their chain hashes: the hash covers
kind and session only for rows that are not plain notifications (RULES.md, section 8).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# A marker's field, as text: SQLite's JSON1, PostgreSQL's jsonb (only for rows classified as
# valid markers, so the cast cannot fail on a quarantined payload).
FIELD = {
    "sqlite": "json_extract(payload, '$.{name}')",
    "postgresql": "CASE WHEN quarantine_reason IS NULL THEN CAST(payload AS jsonb) ->> '{name}' END",
}

NOTIFICATION_COLUMNS = ("seq, received_at, source, channel, message_id, message_type, notification_type, "
                        "workitem_id, reference_id, payload, payload_sha256, chain_hash, duplicate_of, "
                        "quarantine_reason, session")

# Following intervals (a session's "started"/"resumed" marker to its next "lost"/"ended"
# marker, or still open), then, per source, every stretch of time covered by none of them.
INGEST_GAPS = """
WITH markers AS (
  SELECT seq, source, session, received_at, {event} AS event, {cause} AS cause
  FROM event_log
  WHERE kind <> 'notification' AND kind = 'session' AND quarantine_reason IS NULL
),
intervals AS (
  SELECT s.source, s.session, s.seq AS start_seq, s.received_at AS started_at,
         e.seq AS end_seq, e.received_at AS ended_at, e.cause AS cause
  FROM markers s
  LEFT JOIN markers e ON e.seq = (SELECT MIN(x.seq) FROM markers x
                                  WHERE x.session = s.session AND x.seq > s.seq
                                    AND x.event IN ('lost', 'ended'))
  WHERE s.event IN ('started', 'resumed')
),
ordered AS (
  SELECT source, session, start_seq, started_at, end_seq,
         MAX(ended_at) OVER earlier AS earlier_ended_at,
         COUNT(*) OVER earlier AS earlier,
         COUNT(ended_at) OVER earlier AS earlier_closed
  FROM intervals
  WINDOW earlier AS (PARTITION BY source ORDER BY started_at, start_seq
                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
),
gaps AS (
  SELECT source, earlier_ended_at AS gap_started_at, started_at AS gap_ended_at,
         session AS resumed_session, start_seq AS resumed_seq, end_seq AS resumed_end_seq
  FROM ordered
  WHERE earlier > 0 AND earlier = earlier_closed AND earlier_ended_at < started_at
  UNION ALL
  SELECT source, MAX(ended_at), NULL, NULL, NULL, NULL
  FROM intervals
  GROUP BY source
  HAVING COUNT(*) = COUNT(ended_at)
)
SELECT g.source, g.gap_started_at, g.gap_ended_at,
       (SELECT i.cause FROM intervals i WHERE i.source = g.source AND i.ended_at = g.gap_started_at
        ORDER BY i.end_seq DESC LIMIT 1) AS cause,
       (SELECT MIN(s.seq) FROM event_log s
        WHERE s.kind <> 'notification' AND s.kind = 'snapshot' AND s.quarantine_reason IS NULL
          AND s.session = g.resumed_session AND s.seq > g.resumed_seq
          AND (g.resumed_end_seq IS NULL OR s.seq < g.resumed_end_seq)) AS snapshot_seq,
       (SELECT i.session FROM intervals i WHERE i.source = g.source AND i.ended_at = g.gap_started_at
        ORDER BY i.end_seq DESC LIMIT 1) AS lost_session,
       (SELECT MAX(i.end_seq) FROM intervals i WHERE i.source = g.source AND i.ended_at = g.gap_started_at)
        AS lost_seq,
       g.resumed_session, g.resumed_seq
FROM gaps g"""


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.add_column("event_log", sa.Column("kind", sa.Text(), nullable=False, server_default=sa.text("'notification'")))
    op.add_column("event_log", sa.Column("session", sa.Text()))
    op.create_index(op.f("ix_event_log_payload_sha256"), "event_log", ["payload_sha256"],
                    sqlite_where=sa.text("message_id IS NULL"), postgresql_where=sa.text("message_id IS NULL"))
    op.create_index(op.f("ix_event_log_session_received_at"), "event_log", ["session", "received_at"],
                    sqlite_where=sa.text("session IS NOT NULL"), postgresql_where=sa.text("session IS NOT NULL"))
    op.create_index(op.f("ix_event_log_kind_seq"), "event_log", ["kind", "seq"],
                    sqlite_where=sa.text("kind <> 'notification'"),
                    postgresql_where=sa.text("kind <> 'notification'"))
    op.add_column("workitems", sa.Column("source", sa.Text()))
    op.create_index(op.f("ix_workitems_source"), "workitems", ["source"])
    op.execute(f"CREATE VIEW notifications AS SELECT {NOTIFICATION_COLUMNS} FROM event_log "
               "WHERE kind = 'notification'")
    op.execute("CREATE VIEW ingest_gaps AS " + INGEST_GAPS.format(
        event=FIELD[dialect].format(name="event"), cause=FIELD[dialect].format(name="cause")))


def downgrade() -> None:
    op.execute("DROP VIEW ingest_gaps")
    op.execute("DROP VIEW notifications")
    op.drop_index(op.f("ix_workitems_source"), "workitems")
    op.drop_column("workitems", "source")
    for name in ("ix_event_log_kind_seq", "ix_event_log_session_received_at", "ix_event_log_payload_sha256"):
        op.drop_index(name, "event_log")
    op.drop_column("event_log", "session")
    op.drop_column("event_log", "kind")
