"""Opening a database: URL resolution, engine set-up, schema upgrades, transactions.

Every difference between SQLite and PostgreSQL in how the store *connects* lives here, with the
reason next to it; how writers lock, and how long they wait, lives in ``locks``; bulk inserts in
``bulk``; the store's errors, and the translation of driver errors, in ``errors``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

import migrations

from . import locks
from .errors import StoreError, driver_message, hide_password, safe_url, translate_errors

DEFAULT_URL = "sqlite:///workitems.db"
URL_ENV = "WORKITEM_STORE_URL"
MIGRATIONS_DIR = Path(migrations.__file__).parent
# PostgreSQL URLs as people write them (libpq, Heroku, psql): the store's driver is psycopg 3.
_POSTGRESQL_ALIASES = ("postgres", "postgresql")


def resolve_url(db: str | None = None) -> str:
    """``--db`` (a SQLAlchemy URL or a file path), else $WORKITEM_STORE_URL, else the default."""
    value = db or os.environ.get(URL_ENV) or DEFAULT_URL
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).expanduser()}"


def parse_url(db: str | None) -> URL:
    """The URL of ``db`` (see ``resolve_url``); ``postgres://`` and ``postgresql://`` (no
    driver) mean PostgreSQL through psycopg 3, ``postgres+driver://`` means
    ``postgresql+driver://``."""
    url = resolve_url(db)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: e.g. a port that is not a number
        raise StoreError(f"cannot use database URL {safe_url(url)}: {hide_password(str(exc))}") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend in _POSTGRESQL_ALIASES:
        parsed = parsed.set(drivername=f"postgresql+{driver or 'psycopg'}")
    return parsed


def open_engine(db: str | None = None, *, readonly: bool = False) -> Engine:
    parsed = parse_url(db)
    try:
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(parsed, readonly=readonly)
        # connect_timeout: an unreachable server fails a connection in seconds, not minutes.
        return create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    except (ArgumentError, ImportError, ValueError) as exc:
        raise StoreError(f"cannot use database URL {safe_url(parsed)}: {hide_password(str(exc))}") from exc


def _set_wal(dbapi_connection) -> None:
    """Switch a SQLite file to WAL unless it is already (processes opening a new store at once
    race for it: the loser is refused at once, and retries until it sees WAL set)."""
    for _ in range(100):
        if dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            return
        try:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            time.sleep(0.05)
    raise StoreError("cannot switch the SQLite file to WAL mode: another process keeps it locked")


def text_sha256(text: str) -> str:
    """The SHA-256 hex of a text's UTF-8: what a redaction record holds of the payload after it,
    and what event_log's UPDATE trigger computes (``wis_sha256`` on SQLite) to compare with it."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _sha256_hex(value: str | bytes | None) -> str | None:
    """SQL ``wis_sha256(text)``: ``text_sha256`` (of raw bytes for a blob; NULL for NULL)."""
    if value is None:
        return None
    return hashlib.sha256(value).hexdigest() if isinstance(value, bytes) else text_sha256(value)


def _sqlite_engine(url, *, readonly: bool) -> Engine:
    database = url.database or ""
    if database and database != ":memory:":
        path = Path(database)
        if path.is_dir():
            raise StoreError(f"{database} is a directory, not a SQLite file (give the store's file, "
                             f"e.g. --db {shlex.quote(str(path / 'workitems.db'))})")
        if readonly:
            # SQLite's own read-only mode: the connection cannot write whatever SQL it runs.
            uri = urllib.parse.quote(str(path.resolve()))  # (a "?" or "#" in a file name is not the URI's)
            url = url.set(database=f"file:{uri}?mode=ro", query={"uri": "true"})
        elif not path.parent.exists():
            raise StoreError(f"directory {path.parent} does not exist (database {database})")
    engine = create_engine(url, connect_args={"timeout": locks.LOCK_TIMEOUT})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Take transaction control away from the sqlite3 module so that BEGIN is ours (locks).
        dbapi_connection.isolation_level = None
        locks.on_sqlite_connect(dbapi_connection)
        # WAL lets readers (analysts, the projector) run while an importer writes.  Set it only
        # when not set yet: the change takes a lock that a busy writer elsewhere refuses at once
        # ("database is locked", no busy wait), while reading the mode takes none.
        if not readonly:
            _set_wal(dbapi_connection)
        # 64 MiB of page cache (default 2 MiB): rebuilds and big imports insert in key order
        # that is random to the b-trees; with a small cache each insert re-reads pages.
        dbapi_connection.execute("PRAGMA cache_size=-65536")
        # The SHA-256 that event_log's UPDATE trigger compares with the redaction record
        # (migration 0008): without it (the sqlite3 shell) no UPDATE of the log passes.
        dbapi_connection.create_function("wis_sha256", 1, _sha256_hex, deterministic=True)

    event.listen(engine, "begin", locks.on_sqlite_begin)
    return engine


@contextlib.contextmanager
def write_transaction(engine: Engine, timeout: float = locks.LOCK_TIMEOUT) -> Iterator[Connection]:
    """A transaction that will write the log, projections or seals; writers take turns
    (``locks``: SQLite's BEGIN IMMEDIATE, PostgreSQL's table locks that callers take).  A writer
    that waits more than ``timeout`` seconds for a lock gets ``errors.StoreLocked``."""
    with translate_errors(), locks.given_up(timeout), engine.connect() as conn:
        locks.mark_writer(conn, timeout)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                locks.on_postgresql_begin(conn)
            yield conn


def probe_writable(engine: Engine, timeout: float = 1.0) -> int:
    """Take the appenders' lock as an append would (waiting at most ``timeout`` seconds) and
    read the log's head seq, writing nothing.  Raises StoreError when the log cannot be written
    now (StoreLocked: another writer holds the lock)."""
    with write_transaction(engine, timeout) as conn:
        locks.lock_for_append(conn)
        return conn.execute(text("SELECT COALESCE(MAX(seq), 0) FROM event_log")).scalar_one()


@contextlib.contextmanager
def snapshot(engine: Engine):
    """A read-only view of one consistent moment, for reports that run several queries.

    PostgreSQL: REPEATABLE READ (its default READ COMMITTED gives each statement a new snapshot,
    so a projector committing in between would make the checkpoint disagree with the table).
    SQLite: any transaction already reads one snapshot of a WAL database.
    """
    with translate_errors(), engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            yield conn


def run_sql(conn: Connection, sql: str) -> tuple[list[str], list[tuple]]:
    """Run one SQL statement exactly as written (no ":name" placeholders); (column names, rows).

    On PostgreSQL it is prepared (extended protocol), which takes one statement only:
    "COMMIT; DELETE ..." cannot leave the caller's read-only transaction.  SQLite's execute()
    refuses a second statement by itself.
    """
    cursor = conn.connection.cursor()
    try:
        if conn.dialect.name == "postgresql":
            cursor.execute(sql, prepare=True)  # type: ignore[call-arg]  # (psycopg's cursor takes prepare=)
        else:
            cursor.execute(sql)
        if cursor.description is None:
            return [], []
        return [d[0] for d in cursor.description], list(cursor.fetchall())
    except conn.dialect.loaded_dbapi.Error as exc:
        raise StoreError(f"database error: {driver_message(exc)}") from exc
    finally:
        cursor.close()


# -- schema ------------------------------------------------------------------------------------

def alembic_config(conn: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # (only a broken installation has no migrations)
        raise StoreError(f"no schema revisions found in {MIGRATIONS_DIR}")
    return head


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Upgrade the schema to head; returns (revision before, revision after)."""
    with write_transaction(engine) as conn:
        locks.lock_upgrade(conn)
        before = current_revision(conn)
        command.upgrade(alembic_config(conn), "head")
        return before, head_revision()


def ensure_schema(engine: Engine) -> None:
    """Create the schema in an empty database; refuse to work on an outdated one."""
    with translate_errors(), engine.connect() as conn:
        current = current_revision(conn)
    if current is None:
        upgrade(engine)
    elif current != head_revision():
        raise StoreError(_outdated(current))


def _outdated(current: str) -> str:
    return (f"database schema is at revision {current}, this program needs {head_revision()}: "
            "run `workitem-store init` to upgrade it")


def open_reader(db: str | None = None) -> Engine:
    """The engine of an existing store, for commands that only read: it never creates a store
    nor upgrades one.

    SQLite: the file opened read-only, so that no query can change it; a missing file (or a
    directory), or one that is no store (empty, or another database), is refused with a message
    naming it.  PostgreSQL: a database without the store's schema is refused likewise; give
    people a role that can only read (`workitem-store grant-readonly`).
    """
    url = parse_url(db)
    name = safe_url(url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        name = url.database
        path = Path(name)
        if not path.exists() or path.is_dir():
            what = "it is a directory; " if path.is_dir() else ""
            target = str(path / "workitems.db") if path.is_dir() else name
            raise StoreError(f"no store at {name} ({what}create one with `workitem-store init --db "
                             f"{shlex.quote(target)}` or `workitem-store import`)")
    engine = open_engine(db, readonly=True)
    try:
        with engine.connect() as conn:
            current = current_revision(conn)
            is_store = current is not None and inspect(conn).has_table("event_log")
    except DBAPIError as exc:
        engine.dispose()
        if "file is not a database" in str(exc.orig):  # SQLite, on a file that is not SQLite's
            raise StoreError(f"{name} is not a workitem store (not a SQLite database)") from exc
        raise StoreError(f"database error: {driver_message(exc.orig or exc)}") from exc
    if current is None or not is_store:
        engine.dispose()
        raise StoreError(f"{name} is not a workitem store (it has no store schema; `workitem-store init` "
                         "creates one in an empty database)")
    if current != head_revision():
        engine.dispose()
        raise StoreError(_outdated(current))
    return engine


def open_store(db: str | None = None) -> Engine:
    """The engine of a database that is ready for use (schema at head)."""
    engine = open_engine(db)
    ensure_schema(engine)
    return engine
