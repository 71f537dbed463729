"""Erasure: the append-only table ``redactions``, and event_log's one permitted UPDATE.

``redactions``: one row per redaction of a log row (store/redaction.py is its only writer):
which userData keys of which workitems in which seq were replaced by the marker, when, why, by
whom, and the SHA-256 of the payload text after it.  Append-only, like seals.

event_log's UPDATE trigger is replaced: an UPDATE may change ``payload`` alone (every other
column IS NOT DISTINCT FROM its old value), and only to a text whose SHA-256 is the
payload_sha256 of the newest redactions row of that seq; anything else is refused as before.
PostgreSQL computes the hash itself; SQLite calls ``wis_sha256(text)``, which the store
registers on every connection it opens (store/db.py): a client without it (the sqlite3 shell)
cannot redact at all.  DELETE (and TRUNCATE) stay refused.  The downgrade restores 0007's
triggers (and drops the records: redacted payloads stay redacted).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True).with_variant(sa.String(26), "sqlite")
# Every column of event_log but payload: an UPDATE must leave each as it was.
UNCHANGED = ("seq", "received_at", "source", "channel", "message_id", "message_type", "notification_type",
             "workitem_id", "reference_id", "payload_sha256", "chain_hash", "duplicate_of", "quarantine_reason",
             "kind", "session")
REFUSED = "event_log is append-only: UPDATE is refused (only payload may change, to a recorded redaction)"
NEWEST_RECORD = "(SELECT r.payload_sha256 FROM redactions r WHERE r.seq = OLD.seq ORDER BY r.id DESC LIMIT 1)"


def _sqlite_redaction_only() -> str:
    # IS, not =: with no record the subquery is NULL, and a WHEN that is NULL would let it pass.
    same = " AND ".join(f"NEW.{c} IS OLD.{c}" for c in UNCHANGED)
    return f"""CREATE TRIGGER event_log_no_update BEFORE UPDATE ON event_log
               WHEN NOT (NEW.payload IS NOT OLD.payload AND {same}
                         AND {NEWEST_RECORD} IS wis_sha256(NEW.payload))
               BEGIN SELECT RAISE(ABORT, '{REFUSED}'); END"""


def _postgresql_redaction_only() -> list[str]:
    same = ", ".join(f"NEW.{c}" for c in UNCHANGED), ", ".join(f"OLD.{c}" for c in UNCHANGED)
    return [
        f"""CREATE FUNCTION event_log_redaction_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF NEW.payload IS DISTINCT FROM OLD.payload AND ({same[0]}) IS NOT DISTINCT FROM ({same[1]})
                 AND {NEWEST_RECORD} = encode(sha256(convert_to(NEW.payload, 'UTF8')), 'hex') THEN
                RETURN NEW;
              END IF;
              RAISE EXCEPTION '{REFUSED}';
            END $$""",
        """CREATE TRIGGER event_log_no_update BEFORE UPDATE ON event_log
           FOR EACH ROW EXECUTE FUNCTION event_log_redaction_only()""",
        """CREATE TRIGGER event_log_no_delete BEFORE DELETE ON event_log
           FOR EACH ROW EXECUTE FUNCTION event_log_append_only()""",
    ]


def _redactions_append_only(dialect: str) -> list[str]:
    if dialect == "postgresql":  # (seals_append_only: the function of 0006, named by TG_TABLE_NAME)
        return ["""CREATE TRIGGER redactions_no_update_delete BEFORE UPDATE OR DELETE ON redactions
                   FOR EACH ROW EXECUTE FUNCTION seals_append_only()""",
                """CREATE TRIGGER redactions_no_truncate BEFORE TRUNCATE ON redactions
                   FOR EACH STATEMENT EXECUTE FUNCTION seals_append_only()"""]
    return [f"""CREATE TRIGGER redactions_no_{verb.lower()} BEFORE {verb} ON redactions
                BEGIN SELECT RAISE(ABORT, 'redactions is append-only: {verb} is refused'); END"""
            for verb in ("UPDATE", "DELETE")]


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        "redactions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("redacted_at", UTC, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("keys", sa.Text(), nullable=False),
        sa.Column("workitems", sa.Text(), nullable=False),
        sa.Column("payload_sha256", sa.String(64), nullable=False),
        sa.Column("redacted_by", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_redactions")),
    )
    op.create_index(op.f("ix_redactions_seq"), "redactions", ["seq"])
    for statement in _redactions_append_only(dialect):
        op.execute(statement)
    if dialect == "postgresql":
        op.execute("DROP TRIGGER event_log_no_update_delete ON event_log")
        for statement in _postgresql_redaction_only():
            op.execute(statement)
    else:
        op.execute("DROP TRIGGER event_log_no_update")
        op.execute(_sqlite_redaction_only())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER event_log_no_update ON event_log")
        op.execute("DROP TRIGGER event_log_no_delete ON event_log")
        op.execute("DROP FUNCTION event_log_redaction_only()")
        op.execute("""CREATE TRIGGER event_log_no_update_delete BEFORE UPDATE OR DELETE ON event_log
                      FOR EACH ROW EXECUTE FUNCTION event_log_append_only()""")
    else:
        op.execute("DROP TRIGGER event_log_no_update")
        op.execute("""CREATE TRIGGER event_log_no_update BEFORE UPDATE ON event_log
                      BEGIN SELECT RAISE(ABORT, 'event_log is append-only: UPDATE is refused'); END""")
    op.drop_table("redactions")
