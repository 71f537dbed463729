"""Opening a database: URL resolution, engine set-up, schema upgrades, write transactions.

Every difference between SQLite and PostgreSQL in how the store *connects and locks* lives here,
with the reason next to it.
"""

from __future__ import annotations

import contextlib
import gc
import operator
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Table, create_engine, event, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

import migrations

DEFAULT_URL = "sqlite:///workitems.db"
URL_ENV = "WORKITEM_STORE_URL"
MIGRATIONS_DIR = Path(migrations.__file__).parent
# Any fixed number: the key of the PostgreSQL advisory lock that serialises schema upgrades.
_UPGRADE_LOCK_KEY = 0x5717E


class StoreError(Exception):
    """An error the user can act on; the CLI prints its message without a traceback."""


def resolve_url(db: str | None = None) -> str:
    """``--db`` (a SQLAlchemy URL or a file path), else $WORKITEM_STORE_URL, else the default."""
    value = db or os.environ.get(URL_ENV) or DEFAULT_URL
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).expanduser()}"


def parse_url(db: str | None) -> URL:
    url = resolve_url(db)
    try:
        return make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: e.g. a port that is not a number
        raise StoreError(f"cannot use database URL {safe_url(url)}: {hide_password(str(exc))}") from exc


def open_engine(db: str | None = None, *, readonly: bool = False) -> Engine:
    parsed = parse_url(db)
    try:
        if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(parsed, readonly=readonly)
        # connect_timeout: an unreachable server fails a connection in seconds, not minutes.
        return create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    except (ArgumentError, ImportError, ValueError) as exc:
        raise StoreError(f"cannot use database URL {safe_url(parsed)}: {hide_password(str(exc))}") from exc


# -- no secret in any message ------------------------------------------------------------------

# user:password@ in a URL (up to the last @ of the word: a password may hold an @), and a
# libpq conninfo's password=... (quoted or not), as driver errors may quote them.
_URL_PASSWORD = re.compile(r"(://[^\s:/@]*):\S*@")
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def hide_password(message: str) -> str:
    """``message`` with every password in it (of a URL or a conninfo) replaced by ***."""
    return _CONNINFO_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", message))


def safe_url(url: str | URL) -> str:
    """A database URL for messages: its password shown as ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return hide_password(str(url))


def _driver_message(exc: BaseException) -> str:
    """The first line of a driver error, without any password it may quote."""
    lines = str(exc).strip().splitlines()
    return hide_password(lines[0] if lines else type(exc).__name__)


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


def _sqlite_engine(url, *, readonly: bool) -> Engine:
    database = url.database or ""
    if database and database != ":memory:":
        if readonly:
            # SQLite's own read-only mode: the connection cannot write whatever SQL it runs.
            url = url.set(database=f"file:{Path(database).resolve()}?mode=ro", query={"uri": "true"})
        elif not Path(database).parent.exists():
            raise StoreError(f"directory {Path(database).parent} does not exist (database {database})")
    engine = create_engine(url, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Take transaction control away from the sqlite3 module so that BEGIN is ours (below).
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA busy_timeout=60000")
        # WAL lets readers (analysts, the projector) run while an importer writes.  Set it only
        # when not set yet: the change takes a lock that a busy writer elsewhere refuses at once
        # ("database is locked", no busy wait), while reading the mode takes none.
        if not readonly:
            _set_wal(dbapi_connection)
        # 64 MiB of page cache (default 2 MiB): rebuilds and big imports insert in key order
        # that is random to the b-trees; with a small cache each insert re-reads pages.
        dbapi_connection.execute("PRAGMA cache_size=-65536")

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # A writer must hold the write lock from its first read (the log head) to its commit,
        # or two writers could read the same head; BEGIN IMMEDIATE takes that lock up front.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.pop("write", False) else "BEGIN")

    return engine


@contextlib.contextmanager
def write_transaction(engine: Engine):
    """A transaction that will write the log or projections; writers run one at a time.

    SQLite: BEGIN IMMEDIATE.  PostgreSQL: callers lock what they serialise on: appenders the
    event_log table (``log.lock_for_append``), projectors projection_checkpoints (``runner``).
    """
    with translate_errors(), engine.connect() as conn:
        conn.info["write"] = True
        with conn.begin():
            yield conn


def probe_writable(engine: Engine, timeout: float = 1.0) -> int:
    """Take the appenders' lock as an append would (waiting at most ``timeout`` seconds), read
    the log's head seq, roll back.  Raises StoreError when the log cannot be written now.

    SQLite: BEGIN IMMEDIATE with a short busy timeout (the connection's usual 60 s restored
    after).  PostgreSQL: the EXCLUSIVE lock on event_log under a short lock_timeout.
    """
    with translate_errors(), engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            raw = conn.connection.driver_connection
            raw.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            try:
                raw.execute("BEGIN IMMEDIATE")
                try:
                    return raw.execute("SELECT COALESCE(MAX(seq), 0) FROM event_log").fetchone()[0]
                finally:
                    raw.execute("ROLLBACK")
            finally:
                raw.execute("PRAGMA busy_timeout=60000")
        with conn.begin() as transaction:
            conn.execute(text(f"SET LOCAL lock_timeout = '{int(timeout * 1000)}ms'"))
            conn.execute(text("LOCK TABLE event_log IN EXCLUSIVE MODE"))
            head = conn.execute(text("SELECT COALESCE(MAX(seq), 0) FROM event_log")).scalar_one()
            transaction.rollback()
            return head


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
            cursor.execute(sql, prepare=True)
        else:
            cursor.execute(sql)
        if cursor.description is None:
            return [], []
        return [d[0] for d in cursor.description], cursor.fetchall()
    except conn.dialect.loaded_dbapi.Error as exc:
        raise StoreError(f"database error: {_driver_message(exc)}") from exc
    finally:
        cursor.close()


@contextlib.contextmanager
def translate_errors():
    """Driver errors become StoreError with the driver's own first line."""
    try:
        yield
    except DBAPIError as exc:
        raise StoreError(f"database error: {_driver_message(exc.orig or exc)}") from exc


# -- bulk writes -------------------------------------------------------------------------------

_statements: dict[tuple, tuple] = {}


def _statement(table: Table, replace: bool, dialect):
    """INSERT of full rows; with ``replace``, rows whose primary key exists are updated instead.

    Both engines spell the latter INSERT ... ON CONFLICT (pk) DO UPDATE; only the construct's
    module differs.
    """
    if not replace:
        return table.insert()
    stmt = (postgresql if dialect.name == "postgresql" else sqlite).insert(table)
    pk = [c.name for c in table.primary_key.columns]
    return stmt.on_conflict_do_update(
        index_elements=pk, set_={c.name: stmt.excluded[c.name] for c in table.columns if c.name not in pk}
    )


def insert_rows(conn: Connection, table: Table, rows: list[dict], *, replace: bool = False) -> None:
    """Insert full rows (dicts keyed by column name), in order, inside the caller's transaction.

    The same per-column conversions (each column type's bind processor) that
    ``conn.execute(table.insert(), rows)`` would use, without SQLAlchemy's per-row parameter
    bookkeeping, which costs more than SQLite's own insert work (see ``workitem-store bench``).
    PostgreSQL (psycopg 3) writes new rows with COPY (``_copy_rows``); SQLite, and upserts
    (``replace``) on both engines, with one DBAPI executemany.
    """
    if not rows:
        return
    dialect = conn.dialect
    if not replace and dialect.name == "postgresql" and dialect.driver == "psycopg":
        _copy_rows(conn, table, rows)
        return
    key = (table.name, replace, dialect.name)
    if key not in _statements:
        compiled = _statement(table, replace, dialect).compile(
            dialect=dialect, column_keys=[c.name for c in table.columns])
        names = list(compiled.positiontup) if compiled.positional else [c.name for c in table.columns]
        _statements[key] = (compiled.string, compiled.positional, list(zip(names, _processors(table, names, dialect))))
    sql, positional, columns = _statements[key]
    if positional:
        params = list(_converted(rows, columns))
    else:
        params = [{n: p(row[n]) if p else row[n] for n, p in columns} for row in rows]
    conn.exec_driver_sql(sql, params)


def _processors(table: Table, names: list[str], dialect) -> list:
    """Each column's bind processor (None where the value goes to the driver as it is)."""
    return [table.c[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names]


def _converted(rows: list[dict], columns: list[tuple]) -> Iterator[tuple]:
    """Each row's values (a tuple) in the order of ``columns`` ((name, bind processor or None)
    pairs), converted by the processors."""
    getter = operator.itemgetter(*(n for n, _ in columns))
    if len(columns) == 1:
        return ((getter(row),) for row in rows) if columns[0][1] is None else \
            ((columns[0][1](getter(row)),) for row in rows)
    convert = [(i, p) for i, (_, p) in enumerate(columns) if p]
    if not convert:
        return map(getter, rows)

    def values_of(row: dict) -> tuple:
        values = list(getter(row))
        for i, p in convert:
            values[i] = p(values[i])
        return tuple(values)

    return map(values_of, rows)


def _copy_rows(conn: Connection, table: Table, rows: list[dict]) -> None:
    """New rows into a PostgreSQL table with COPY FROM STDIN on the connection's psycopg
    connection, in the caller's transaction (and under whatever lock it holds), in order.

    Text format: each value goes through its column's bind processor (a JSON value becomes
    psycopg's Jsonb wrapper, a UTC datetime is checked for a time zone), then psycopg's text
    dumper (JSON text, ISO timestamp with offset, digits, t/f, \\N for NULL) and COPY's escaping
    of backslash, tab, newline and carriage return; the server reads each with the column type's
    input function.  The rows are INSERT's, value for value (tests/test_bulk_paths.py).
    (Measured on event_log: COPY 2.5x faster than executemany, binary COPY no faster than text.)
    """
    dialect = conn.dialect
    key = (table.name, "copy", dialect.name)
    if key not in _statements:
        names = [c.name for c in table.columns]
        quote = dialect.identifier_preparer
        sql = f"COPY {quote.format_table(table)} ({', '.join(map(quote.quote, names))}) FROM STDIN"
        _statements[key] = (sql, None, list(zip(names, _processors(table, names, dialect))))
    sql, _, columns = _statements[key]
    dbapi = dialect.loaded_dbapi
    if not conn.in_transaction():
        conn.begin()  # as executing a statement would (autobegin): the caller's commit() commits it
    try:
        with conn.connection.driver_connection.cursor() as cursor, cursor.copy(sql) as copy:
            write_row = copy.write_row
            for values in _converted(rows, columns):
                write_row(values)
    except dbapi.Error as exc:
        # As SQLAlchemy reports a failed statement: translate_errors and callers catch DBAPIError.
        raise DBAPIError.instance(sql, None, exc, dbapi.Error, dialect=dialect) from exc


@contextlib.contextmanager
def collections_postponed():
    """Postpone CPython's cyclic garbage collector during bulk work (imports, projecting).

    Bulk work creates millions of small acyclic objects (events, rows) that reference counting
    frees; meanwhile the cyclic collector would rescan the growing state again and again (a
    third of rebuild time, measured).  It resumes afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# -- schema ------------------------------------------------------------------------------------

def alembic_config(conn: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Upgrade the schema to head; returns (revision before, revision after)."""
    with write_transaction(engine) as conn:
        if conn.dialect.name == "postgresql":
            # Two processes initialising one empty database must not both create tables.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _UPGRADE_LOCK_KEY})
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

    SQLite: the file opened read-only, so that no query can change it; a missing file, or one
    that is no store (empty, or another database), is refused.  PostgreSQL: a database
    without the store's schema is refused likewise; give people a role that can only read
    (`workitem-store grant-readonly`).
    """
    url = parse_url(db)
    name = safe_url(url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        name = url.database
        if not Path(name).exists():
            raise StoreError(f"{name} does not exist: there is no store to read (`workitem-store init` "
                             "or `workitem-store import` creates one)")
    engine = open_engine(db, readonly=True)
    try:
        with engine.connect() as conn:
            current = current_revision(conn)
            is_store = current is not None and inspect(conn).has_table("event_log")
    except DBAPIError as exc:
        engine.dispose()
        if "file is not a database" in str(exc.orig):  # SQLite, on a file that is not SQLite's
            raise StoreError(f"{name} is not a workitem store (not a SQLite database)") from exc
        raise StoreError(f"database error: {_driver_message(exc.orig or exc)}") from exc
    if not is_store:
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
