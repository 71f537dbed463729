"""Row counts of the log kept as it is appended; imports that commit in steps.

``event_log_counts``: ``status`` counted every row of event_log on each call (0.74 s at a
million rows).  log.py now adds each append's counts here in the same transaction; this
revision fills the table from the log as it stands.

``projection_checkpoints.rows``: the row count of each projection's table, kept by the runner
in each step's transaction (filled here from the tables as they stand).

``imported_files.complete`` and ``resume_offset``: a large file is imported in several
transactions (one transaction made the SQLite WAL grow to the size of the import); until the
last one commits its record says complete = false and how many bytes of the file are in the
log, and importing the file again resumes there (docs/RULES.md 7).  Earlier imports were
whole: complete.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

PROJECTION_TABLES = ("workitems", "workitem_transitions", "capability_history", "request_outcomes")


def upgrade() -> None:
    op.create_table(
        "event_log_counts",
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("quarantine_reason", sa.Text(), nullable=False),
        sa.Column("duplicate", sa.Boolean(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "quarantine_reason", "duplicate", name=op.f("pk_event_log_counts")),
    )
    op.execute("""
        INSERT INTO event_log_counts (kind, quarantine_reason, duplicate, rows)
        SELECT kind, COALESCE(quarantine_reason, ''), duplicate_of IS NOT NULL, count(*)
        FROM event_log GROUP BY kind, COALESCE(quarantine_reason, ''), duplicate_of IS NOT NULL
    """)
    with op.batch_alter_table("projection_checkpoints") as batch:
        batch.add_column(sa.Column("rows", sa.BigInteger(), nullable=False, server_default=sa.text("0")))
    for table in PROJECTION_TABLES:
        op.execute(f"UPDATE projection_checkpoints SET rows = (SELECT count(*) FROM {table}) "
                   f"WHERE projection = '{table}'")
    with op.batch_alter_table("imported_files") as batch:
        batch.add_column(sa.Column("complete", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column("resume_offset", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("projection_checkpoints") as batch:
        batch.drop_column("rows")
    with op.batch_alter_table("imported_files") as batch:
        batch.drop_column("resume_offset")
        batch.drop_column("complete")
    op.drop_table("event_log_counts")
