"""Signed seals of the log's head, and the store's identity (docs/RULES.md section 9).

``store_identity``: one row, written here once: a random ``store_id`` that every seal names, so
a seal of one store is never taken for a seal of another.  ``seals``: every seal made of this
store (store/seals.py is its only writer), append-only like event_log.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""
import datetime as dt
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

APPEND_ONLY = ("store_identity", "seals")


def _append_only_statements(dialect: str) -> list[str]:
    if dialect == "postgresql":
        statements = ["""CREATE FUNCTION seals_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
                         BEGIN RAISE EXCEPTION '% is append-only: % is refused', TG_TABLE_NAME, TG_OP; END $$"""]
        for table in APPEND_ONLY:
            statements += [
                f"""CREATE TRIGGER {table}_no_update_delete BEFORE UPDATE OR DELETE ON {table}
                    FOR EACH ROW EXECUTE FUNCTION seals_append_only()""",
                f"""CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table}
                    FOR EACH STATEMENT EXECUTE FUNCTION seals_append_only()""",
            ]
        return statements
    return [f"""CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table}
                BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} is refused'); END"""
            for table in APPEND_ONLY for verb in ("UPDATE", "DELETE")]


def upgrade() -> None:
    op.create_table(
        "store_identity",
        sa.Column("store_id", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("store_id", name=op.f("pk_store_identity")),
    )
    created_at = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")[:26] + "Z"
    op.execute(sa.text("INSERT INTO store_identity (store_id, created_at) VALUES (:id, :at)").bindparams(
        id=str(uuid.uuid4()), at=created_at))
    op.create_table(
        "seals",
        sa.Column("n", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=False, nullable=False),
        sa.Column("store_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("chain_hash", sa.String(64), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("sealed_at", sa.Text(), nullable=False),
        sa.Column("witnessed", sa.Boolean(), nullable=False),
        sa.Column("prev", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("n", name=op.f("pk_seals")),
    )
    op.create_index(op.f("ix_seals_seq"), "seals", ["seq"])
    for statement in _append_only_statements(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("seals")
    op.drop_table("store_identity")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION seals_append_only()")
