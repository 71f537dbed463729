"""Every table of the store, as SQLAlchemy Core objects.

This module is the contract analysts query (documented column by column in docs/SQL.md).
Alembic migrations in ``migrations/`` create these tables; a test checks that the two agree
on SQLite and PostgreSQL.  Nothing here creates tables itself.
"""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


# SQLite text of recently seen instants.  A rebuild writes each event's time into several rows
# (and read it as text a moment before): formatting once instead of each time is a measurable
# share of rebuild time.  Bounded: cleared when full.
_SQLITE_TEXT: dict[dt.datetime, str] = {}


def _remember(value: dt.datetime, text: str) -> None:
    if len(_SQLITE_TEXT) > 50_000:  # (a projection step writes 20,000 events)
        _SQLITE_TEXT.clear()
    _SQLITE_TEXT[value] = text


class UTCDateTime(TypeDecorator):
    """A UTC instant: ``timestamptz`` on PostgreSQL, ISO-8601 text on SQLite.

    On SQLite the text is ``YYYY-MM-DD HH:MM:SS.ffffff`` (UTC, no offset): the form SQLite's own
    date functions read and produce, so ``received_at > datetime('now', '-1 hour')`` compares
    correctly.  Python values are always timezone-aware UTC datetimes.
    """

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(26))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store only takes UTC-aware times")
        if dialect.name != "sqlite":
            return value
        text = _SQLITE_TEXT.get(value)
        if text is None:
            text = value.astimezone(dt.UTC).isoformat(" ", "microseconds")[:26]
            _remember(value, text)
        return text

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if isinstance(value, str):
            text, value = value, dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)
            _remember(value, text)
            return value
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class SQLiteJSONText(TypeDecorator):
    """JSON in a TEXT column on SQLite, written and read as SQLAlchemy's JSON type does.

    A column declared JSON has NUMERIC affinity in SQLite, which turns the text of a bare
    number into a number: 123456789012345678901234567890 came back rounded to 1.2345678901234568e+29.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return json.dumps(value)  # None as JSON null, as SQLAlchemy's JSON type writes it

    def process_result_value(self, value, dialect):
        return None if value is None else json.loads(value)


# JSON values: JSON text on SQLite, jsonb on PostgreSQL (comparable, indexable, its operators);
# values too large for jsonb are stored in a degraded form on both (projections/workitems.py).
JSONValue = JSON().with_variant(SQLiteJSONText(), "sqlite").with_variant(JSONB(), "postgresql")

event_log = Table(
    "event_log",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("source", Text, nullable=False),
    Column("channel", Text),
    Column("message_id", Text),
    Column("message_type", Text),
    Column("notification_type", Text),
    Column("workitem_id", Text),
    Column("reference_id", Text),
    Column("payload", Text, nullable=False),
    Column("payload_sha256", String(64), nullable=False),
    Column("chain_hash", String(64), nullable=False),
    Column("duplicate_of", BigInteger),
    Column("quarantine_reason", Text),
    Column("kind", Text, nullable=False, server_default=text("'notification'")),
    Column("session", Text),
    Index(None, "workitem_id", "seq"),
    Index(None, "source", "reference_id"),
    Index(None, "source", "message_id"),
    # Partial indexes: only the rows each serves.  Queries repeat the WHERE term literally (SQLite
    # uses a partial index only when the query's WHERE implies the index's).
    Index(None, "payload_sha256", sqlite_where=text("message_id IS NULL"),
          postgresql_where=text("message_id IS NULL")),  # duplicates without ids (log.py)
    Index(None, "session", "received_at", sqlite_where=text("session IS NOT NULL"),
          postgresql_where=text("session IS NOT NULL")),  # a live session's rows
    Index(None, "kind", "seq", sqlite_where=text("kind <> 'notification'"),
          postgresql_where=text("kind <> 'notification'")),  # markers and snapshots
)

# Row counts of event_log by kind, quarantine reason ('' for none) and whether the row is a
# duplicate, kept by log.py in each append's transaction: `status` reads them instead of
# counting the log (docs/SQL.md).  verify checks them against the log.
event_log_counts = Table(
    "event_log_counts",
    metadata,
    Column("kind", Text, primary_key=True),
    Column("quarantine_reason", Text, primary_key=True),
    Column("duplicate", Boolean, primary_key=True),
    Column("rows", BigInteger, nullable=False),
)

imported_files = Table(
    "imported_files",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("file_name", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("rows", Integer, nullable=False),
    Column("first_seq", BigInteger),
    Column("last_seq", BigInteger),
    Column("imported_at", UTCDateTime, nullable=False),
    # False while a file imported in several transactions is not all in the log (ingest/files.py);
    # resume_offset: the bytes of the file that are, where importing it again resumes.
    Column("complete", Boolean, nullable=False, server_default=true()),
    Column("resume_offset", BigInteger),
    Index(None, "sha256"),
)

workitems = Table(
    "workitems",
    metadata,
    Column("workitem_id", Text, primary_key=True),
    Column("state", Text),
    Column("workitem_type", Text),
    Column("uri", Text),
    Column("capabilities", JSONValue),
    Column("user_data", JSONValue),
    Column("first_seq", BigInteger, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("first_seen_at", UTCDateTime, nullable=False),
    Column("last_seen_at", UTCDateTime, nullable=False),
    Column("notification_count", Integer, nullable=False),
    Column("error_count", Integer, nullable=False),
    Column("source", Text),
    Index(None, "source"),
)

workitem_transitions = Table(
    "workitem_transitions",
    metadata,
    Column("workitem_id", Text, primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("at", UTCDateTime, nullable=False),
    Column("from_state", Text),
    Column("to_state", Text, nullable=False),
    Column("notification_type", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("reference_id", Text),
)

capability_history = Table(
    "capability_history",
    metadata,
    Column("workitem_id", Text, primary_key=True),
    Column("capability", Text, primary_key=True),
    Column("granted_seq", BigInteger, primary_key=True),
    Column("granted_at", UTCDateTime, nullable=False),
    Column("revoked_seq", BigInteger),
    Column("revoked_at", UTCDateTime),
)

request_outcomes = Table(
    "request_outcomes",
    metadata,
    Column("source", Text, primary_key=True),
    Column("reference_id", Text, primary_key=True),
    Column("workitem_id", Text),
    Column("outcome", Text, nullable=False),
    Column("error_code", Text),
    Column("error_message", Text),
    Column("notification_count", Integer, nullable=False),
    Column("first_seq", BigInteger, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("first_at", UTCDateTime, nullable=False),
    Column("last_at", UTCDateTime, nullable=False),
    Index(None, "workitem_id"),
)

projection_checkpoints = Table(
    "projection_checkpoints",
    metadata,
    Column("projection", Text, primary_key=True),
    Column("last_seq", BigInteger, nullable=False, server_default=text("0")),
    Column("version", Integer, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # Rows in the projection's table, kept by the runner with each step (`status` reads it).
    Column("rows", BigInteger, nullable=False, server_default=text("0")),
)

# Log rows a projection could not apply: skipped, recorded here (docs/RULES.md 6.1).
projection_errors = Table(
    "projection_errors",
    metadata,
    Column("projection", Text, primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("error", Text, nullable=False),
)

# The store's identity: one row, written once by migration 0006; every seal names it.
store_identity = Table(
    "store_identity",
    metadata,
    Column("store_id", Text, primary_key=True),
    Column("created_at", Text, nullable=False),
)

# Signed statements of the log's head (store/seals.py, docs/RULES.md section 9); append-only.
# The columns are the seal's fields, as in the witness file's JSON line.
seals = Table(
    "seals",
    metadata,
    Column("n", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False),
    Column("store_id", Text, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("chain_hash", String(64), nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("sealed_at", Text, nullable=False),
    Column("witnessed", Boolean, nullable=False),
    Column("prev", String(64), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("signature", Text, nullable=False),
    Index(None, "seq"),
)

# Each redaction of a log row (store/redaction.py, its only writer; docs/RULES.md): the userData
# keys whose values were replaced by the marker and the workitems whose userData held them (JSON
# arrays, sorted), and the SHA-256 of the payload text after it.  Append-only; the newest row
# of a seq matches its stored payload.
redactions = Table(
    "redactions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("seq", BigInteger, nullable=False),
    Column("redacted_at", UTCDateTime, nullable=False),
    Column("reason", Text, nullable=False),
    Column("keys", Text, nullable=False),
    Column("workitems", Text, nullable=False),
    Column("payload_sha256", String(64), nullable=False),
    Column("redacted_by", Text, nullable=False),
    Index(None, "seq"),
)

PROJECTION_TABLES = (workitems, workitem_transitions, capability_history, request_outcomes)

# -- views (created by migration 0002; declared here so code can query them with Core) --------
# A MetaData of their own: autogenerate must not mistake them for missing tables.
views_metadata = MetaData()

workitem_state_durations = Table(
    "workitem_state_durations", views_metadata,
    Column("workitem_id", Text), Column("state", Text),
    Column("entered_seq", BigInteger), Column("entered_at", UTCDateTime),
    Column("left_seq", BigInteger), Column("left_at", UTCDateTime), Column("seconds", Float),
)
request_outcome_summary = Table(
    "request_outcome_summary", views_metadata,
    Column("source", Text), Column("hour", Text), Column("requests", Integer),
    Column("failed", Integer), Column("failure_rate", Float),
)
capability_timeline = Table(
    "capability_timeline", views_metadata,
    Column("workitem_id", Text), Column("capability", Text),
    Column("granted_seq", BigInteger), Column("granted_at", UTCDateTime),
    Column("revoked_seq", BigInteger), Column("revoked_at", UTCDateTime),
    Column("seconds", Float), Column("is_open", Integer),
)

notifications = Table(
    "notifications", views_metadata,
    *(Column(c.name, c.type) for c in event_log.columns if c.name not in ("kind", "session")),
    Column("session", Text),
)
ingest_gaps = Table(
    "ingest_gaps", views_metadata,
    Column("source", Text), Column("gap_started_at", UTCDateTime), Column("gap_ended_at", UTCDateTime),
    Column("cause", Text), Column("snapshot_seq", BigInteger), Column("lost_session", Text),
    Column("lost_seq", BigInteger), Column("resumed_session", Text), Column("resumed_seq", BigInteger),
)

workitem_summary = Table(
    "workitem_summary", views_metadata,
    Column("workitem_id", Text), Column("final_state", Text), Column("source", Text),
    Column("first_seen_at", UTCDateTime), Column("invited_at", UTCDateTime),
    Column("accepted_at", UTCDateTime), Column("completed_at", UTCDateTime), Column("last_seen_at", UTCDateTime),
    Column("rejected", Boolean), Column("rejections", Integer), Column("transfers", Integer),
    Column("revocations", Integer), Column("time_to_accept_seconds", Float), Column("handling_seconds", Float),
    Column("notification_count", Integer), Column("error_count", Integer),
)

VIEWS = (workitem_state_durations, request_outcome_summary, capability_timeline, notifications, ingest_gaps,
         workitem_summary)
