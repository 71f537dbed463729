"""Projections that never stop: the table projection_errors; SQLite JSON columns as TEXT.

``projection_errors`` records each log row a projection could not apply (docs/RULES.md 6.1).
On SQLite ``workitems.capabilities`` and ``workitems.user_data`` were declared JSON, which
gives a column NUMERIC affinity: SQLite turned the JSON text of a bare number into a number
(``123456789012345678901234567890`` came back rounded).  Declared TEXT, they keep the text.
The projections' versions change with this revision, so the next ``project`` rebuilds them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

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
    if op.get_bind().dialect.name == "sqlite":
        # Declared JSON, the columns had NUMERIC affinity (a bare number's text became a
        # rounded number); TEXT keeps the text.  SQLite changes a type by copying the table.
        with op.batch_alter_table("workitems", recreate="always") as batch:
            for column in JSON_COLUMNS:
                batch.alter_column(column, type_=sa.Text())


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("workitems", recreate="always") as batch:
            for column in JSON_COLUMNS:
                batch.alter_column(column, type_=sa.JSON())
    op.drop_table("projection_errors")
