"""Projections that never stop: the table projection_errors, and JSON columns as JSON text on
both engines (SQLite TEXT, PostgreSQL json).

``projection_errors`` records each log row a projection could not apply (docs/RULES.md 5.6).
On PostgreSQL ``workitems.capabilities`` and ``workitems.user_data`` change from ``jsonb`` to
``json``: the JSON text exactly as the store wrote it, as SQLite keeps it.  ``jsonb`` rewrote
numbers (``1e300`` came back as a 301-digit integer, so ``verify`` saw a difference where there
was none) and refused values it cannot hold (arrays of tens of millions of elements), which
stopped projecting for good.  The projections' versions change with this revision, so the next
``project`` rebuilds them in the new form.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JSON_COLUMNS = ("capabilities", "user_data")


def upgrade() -> None:
    op.create_table(
        "projection_errors",
        sa.Column("projection", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("projection", "seq", name=op.f("pk_projection_errors")),
    )
    if op.get_bind().dialect.name == "postgresql":
        for column in JSON_COLUMNS:
            op.alter_column("workitems", column, type_=postgresql.JSON(),
                            postgresql_using=f"CAST(CAST({column} AS text) AS json)")
    else:
        # Declared JSON, the columns had NUMERIC affinity (a bare number's text became a
        # rounded number); TEXT keeps the text.  SQLite changes a type by copying the table.
        with op.batch_alter_table("workitems", recreate="always") as batch:
            for column in JSON_COLUMNS:
                batch.alter_column(column, type_=sa.Text())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for column in JSON_COLUMNS:
            op.alter_column("workitems", column, type_=postgresql.JSONB(),
                            postgresql_using=f"CAST(CAST({column} AS text) AS jsonb)")
    else:
        with op.batch_alter_table("workitems", recreate="always") as batch:
            for column in JSON_COLUMNS:
                batch.alter_column(column, type_=sa.JSON())
    op.drop_table("projection_errors")
