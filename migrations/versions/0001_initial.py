"""Initial schema: event log (append-only), imported files, projections, checkpoints.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Types frozen here as they were at this revision (migrations never import the live schema).
UTC = sa.DateTime(timezone=True).with_variant(sa.String(26), "sqlite")
JSONV = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

APPEND_ONLY_SQLITE = [
    f"""CREATE TRIGGER event_log_no_{verb.lower()} BEFORE {verb} ON event_log
        BEGIN SELECT RAISE(ABORT, 'event_log is append-only: {verb} is refused'); END"""
    for verb in ("UPDATE", "DELETE")
]
APPEND_ONLY_POSTGRESQL = [
    """CREATE FUNCTION event_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN RAISE EXCEPTION 'event_log is append-only: % is refused', TG_OP; END $$""",
    """CREATE TRIGGER event_log_no_update_delete BEFORE UPDATE OR DELETE ON event_log
       FOR EACH ROW EXECUTE FUNCTION event_log_append_only()""",
    """CREATE TRIGGER event_log_no_truncate BEFORE TRUNCATE ON event_log
       FOR EACH STATEMENT EXECUTE FUNCTION event_log_append_only()""",
]


def upgrade() -> None:
    op.create_table(
        "event_log",
        sa.Column("seq", SEQ, autoincrement=False, nullable=False),
        sa.Column("received_at", UTC, nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text()),
        sa.Column("message_id", sa.Text()),
        sa.Column("message_type", sa.Text()),
        sa.Column("notification_type", sa.Text()),
        sa.Column("workitem_id", sa.Text()),
        sa.Column("reference_id", sa.Text()),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("payload_sha256", sa.String(64), nullable=False),
        sa.Column("chain_hash", sa.String(64), nullable=False),
        sa.Column("duplicate_of", sa.BigInteger()),
        sa.Column("quarantine_reason", sa.Text()),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_event_log")),
    )
    op.create_index(op.f("ix_event_log_source_message_id"), "event_log", ["source", "message_id"])
    op.create_index(op.f("ix_event_log_source_reference_id"), "event_log", ["source", "reference_id"])
    op.create_index(op.f("ix_event_log_workitem_id_seq"), "event_log", ["workitem_id", "seq"])
    for statement in APPEND_ONLY_POSTGRESQL if op.get_bind().dialect.name == "postgresql" else APPEND_ONLY_SQLITE:
        op.execute(statement)

    op.create_table(
        "imported_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("file_name", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("first_seq", sa.BigInteger()),
        sa.Column("last_seq", sa.BigInteger()),
        sa.Column("imported_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_imported_files")),
    )
    op.create_index(op.f("ix_imported_files_sha256"), "imported_files", ["sha256"])

    op.create_table(
        "workitems",
        sa.Column("workitem_id", sa.Text(), nullable=False),
        sa.Column("state", sa.Text()),
        sa.Column("workitem_type", sa.Text()),
        sa.Column("uri", sa.Text()),
        sa.Column("capabilities", JSONV),
        sa.Column("user_data", JSONV),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("first_seen_at", UTC, nullable=False),
        sa.Column("last_seen_at", UTC, nullable=False),
        sa.Column("notification_count", sa.Integer(), nullable=False),
        sa.Column("error_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("workitem_id", name=op.f("pk_workitems")),
    )
    op.create_table(
        "workitem_transitions",
        sa.Column("workitem_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("at", UTC, nullable=False),
        sa.Column("from_state", sa.Text()),
        sa.Column("to_state", sa.Text(), nullable=False),
        sa.Column("notification_type", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("reference_id", sa.Text()),
        sa.PrimaryKeyConstraint("workitem_id", "seq", name=op.f("pk_workitem_transitions")),
    )
    op.create_table(
        "capability_history",
        sa.Column("workitem_id", sa.Text(), nullable=False),
        sa.Column("capability", sa.Text(), nullable=False),
        sa.Column("granted_seq", sa.BigInteger(), nullable=False),
        sa.Column("granted_at", UTC, nullable=False),
        sa.Column("revoked_seq", sa.BigInteger()),
        sa.Column("revoked_at", UTC),
        sa.PrimaryKeyConstraint("workitem_id", "capability", "granted_seq", name=op.f("pk_capability_history")),
    )
    op.create_table(
        "request_outcomes",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("reference_id", sa.Text(), nullable=False),
        sa.Column("workitem_id", sa.Text()),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("error_code", sa.Text()),
        sa.Column("error_message", sa.Text()),
        sa.Column("notification_count", sa.Integer(), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("first_at", UTC, nullable=False),
        sa.Column("last_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("source", "reference_id", name=op.f("pk_request_outcomes")),
    )
    op.create_index(op.f("ix_request_outcomes_workitem_id"), "request_outcomes", ["workitem_id"])
    op.create_table(
        "projection_checkpoints",
        sa.Column("projection", sa.Text(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("projection", name=op.f("pk_projection_checkpoints")),
    )


def downgrade() -> None:
    for table in ("projection_checkpoints", "request_outcomes", "capability_history",
                  "workitem_transitions", "workitems", "imported_files", "event_log"):
        op.drop_table(table)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION event_log_append_only()")
