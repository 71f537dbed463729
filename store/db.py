"""Opening a database: URL resolution, engine set-up, schema upgrades, write transactions.

Every difference between SQLite and PostgreSQL in how the store *connects and locks* lives here,
with the reason next to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import gc
import operator
import os
import re
import sqlite3
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Table, bindparam, create_engine, event, inspect, text
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


def _parse_url(db: str | None) -> URL:
    url = resolve_url(db)
    try:
        return make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: e.g. a port that is not a number
        raise StoreError(f"cannot use database URL {safe_url(url)}: {hide_password(str(exc))}") from exc


def open_engine(db: str | None = None, *, readonly: bool = False) -> Engine:
    parsed = _parse_url(db)
    try:
        if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(parsed, readonly=readonly)
        # connect_timeout: an unreachable server fails a connection in seconds, not minutes.
        return create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    except (ArgumentError, ImportError, ValueError) as exc:
        raise StoreError(f"cannot use database URL {safe_url(parsed)}: {hide_password(str(exc))}") from exc


def url_as(db: str | None, role: str, password: str | None = None) -> str:
    """The PostgreSQL URL of ``db`` (--db as the CLI takes it) with ``role`` (and ``password``)
    as its user: a login of its own, not SET ROLE (which a statement could undo)."""
    url = _parse_url(db)
    if url.get_backend_name() != "postgresql":
        raise StoreError("--as is for PostgreSQL; a SQLite file has no roles")
    return url.set(username=role, password=password).render_as_string(hide_password=False)


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


# -- `workitem-store query`: anyone's SQL, fenced in ----------------------------------------------

QUERY_ROLE_HINT = ("run it as a role that can only read: the store's owner makes one with "
                   "`workitem-store grant-readonly ROLE --login`, then give `query --as ROLE` "
                   "(with --password-env VAR if it needs a password) or a --db URL with that user")


def run_query(conn: Connection, sql: str, *, timeout: float) -> tuple[list[str], list[tuple]]:
    """``run_sql`` for `workitem-store query`, whose SQL comes from anyone: at most ``timeout``
    seconds, and only reads.

    PostgreSQL: SET LOCAL statement_timeout, and the connected role must be one that can only
    read (``check_query_role``): a read-only transaction alone does not stop a superuser's
    ``pg_read_file`` or ``COPY ... TO PROGRAM``.  SQLite: a progress handler aborts the query
    at the deadline, and an authorizer refuses everything but reading (``_SqliteFence``).
    """
    if conn.dialect.name == "postgresql":
        with translate_errors():
            # First, so that the check below is bounded too.  Changing statement_timeout inside
            # the query does not help it: the timer of a statement is set when it starts.
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, round(timeout * 1000))}")
            check_query_role(conn)
        try:
            return run_sql(conn, sql)
        except StoreError as exc:
            # 57014 query_canceled; also what pg_cancel_backend gives, hence the message check.
            if getattr(exc.__cause__, "sqlstate", None) == "57014" and "statement timeout" in str(exc):
                raise StoreError(f"query cancelled after {timeout:g} s (--timeout)") from exc
            raise
    with _SqliteFence(conn.connection.driver_connection, timeout) as fence:
        try:
            return run_sql(conn, sql)
        except StoreError as exc:
            if fence.refused:
                raise StoreError(f"not authorized: {fence.refused} is refused by `query` (it only reads)") from exc
            if fence.timed_out:
                raise StoreError(f"query cancelled after {timeout:g} s (--timeout)") from exc
            raise


# Roles whose members can reach the server's files, programs or other sessions, or write any table.
_DANGEROUS_ROLES = ("pg_read_server_files", "pg_write_server_files", "pg_execute_server_program",
                    "pg_signal_backend", "pg_write_all_data")


def check_query_role(conn: Connection) -> None:
    """Raise StoreError unless the connected role can do nothing but read (PostgreSQL).

    Both session_user and current_user count, and with them every role either is a member of
    (it could SET ROLE to one: a statement can do that itself with set_config('role', ...)).
    Refused: a superuser or CREATEROLE role; a member of a role in _DANGEROUS_ROLES; a role that
    owns, or may INSERT, UPDATE, DELETE, TRUNCATE or TRIGGER, any table or view of the database;
    one with CREATE or TEMPORARY on the database, or CREATE on any of its schemas.
    """
    who = conn.execute(text("SELECT session_user, current_user")).one()
    names = " and ".join(dict.fromkeys(who))  # one name when they are the same
    members = ("(SELECT oid, rolname, rolsuper, rolcreaterole FROM pg_roles "
               "WHERE pg_has_role(session_user, oid, 'MEMBER') OR pg_has_role(current_user, oid, 'MEMBER'))")
    # A superuser first: every other check would list everything for it.
    supers = conn.execute(text(f"SELECT rolname FROM {members} m WHERE rolsuper ORDER BY 1")).scalars().all()
    if supers:
        via = "" if set(supers) & set(who) else f" (a member of {supers[0]})"
        raise StoreError(f"`query` refuses to run as PostgreSQL role {names}: it is a superuser{via}, which "
                         f"reads the server's files whatever the transaction; {QUERY_ROLE_HINT}")
    user_schemas = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp_)'"
    rows = conn.execute(text(f"""
        WITH m AS {members}
        SELECT m.rolname, 'has CREATEROLE (it can make itself a member of any role)' FROM m WHERE rolcreaterole
        UNION ALL
        SELECT session_user::text, 'is a member of ' || m.rolname FROM m WHERE m.rolname IN :dangerous
        UNION ALL
        SELECT m.rolname, 'owns ' || c.relname FROM m
            JOIN pg_class c ON c.relowner = m.oid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND {user_schemas}
        UNION ALL
        SELECT m.rolname, 'may write ' || c.relname FROM m
            CROSS JOIN pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND {user_schemas} AND c.relowner <> m.oid
              AND has_table_privilege(m.oid, c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER')
        UNION ALL
        SELECT m.rolname, 'may ' || p.privilege || ' on database ' || current_database() FROM m
            CROSS JOIN (VALUES ('CREATE'), ('TEMPORARY')) AS p(privilege)
            WHERE has_database_privilege(m.oid, current_database(), p.privilege)
        UNION ALL
        SELECT m.rolname, 'may CREATE in schema ' || n.nspname FROM m CROSS JOIN pg_namespace n
            WHERE {user_schemas} AND has_schema_privilege(m.oid, n.oid, 'CREATE')
        """).bindparams(bindparam("dangerous", expanding=True)), {"dangerous": list(_DANGEROUS_ROLES)}).all()
    if rows:
        # "it may write workitems", or "through role x it may write workitems"
        problems = list(dict.fromkeys(f"it {what}" if role in who else f"through role {role} it {what}"
                                      for role, what in rows))
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise StoreError(f"`query` refuses to run as PostgreSQL role {names}, which can do more than read: "
                         f"{'; '.join(problems[:5])}{more}; {QUERY_ROLE_HINT}")


# SQLite's authorizer action codes (sqlite3.h), by name: the messages say what was refused.
_SQLITE_ACTIONS = {getattr(sqlite3, f"SQLITE_{name}"): name.replace("_", " ") for name in (
    "CREATE_INDEX", "CREATE_TABLE", "CREATE_TEMP_INDEX", "CREATE_TEMP_TABLE", "CREATE_TEMP_TRIGGER",
    "CREATE_TEMP_VIEW", "CREATE_TRIGGER", "CREATE_VIEW", "DELETE", "DROP_INDEX", "DROP_TABLE",
    "DROP_TEMP_INDEX", "DROP_TEMP_TABLE", "DROP_TEMP_TRIGGER", "DROP_TEMP_VIEW", "DROP_TRIGGER",
    "DROP_VIEW", "INSERT", "PRAGMA", "READ", "SELECT", "TRANSACTION", "UPDATE", "ATTACH", "DETACH",
    "ALTER_TABLE", "REINDEX", "ANALYZE", "CREATE_VTABLE", "DROP_VTABLE", "FUNCTION", "SAVEPOINT",
    "RECURSIVE")}
_SCHEMA_WRITES = (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE)
# PRAGMAs that only read: without an argument, or with one (a table or index name).
_READ_PRAGMAS = {"application_id", "collation_list", "compile_options", "data_version", "database_list",
                 "encoding", "foreign_keys", "freelist_count", "function_list", "module_list", "page_count",
                 "page_size", "pragma_list", "schema_version", "table_list", "user_version"}
_NAME_PRAGMAS = {"foreign_key_list", "index_info", "index_list", "index_xinfo", "table_info", "table_list",
                 "table_xinfo"}
# Functions that reach files or load code (readfile, writefile, edit: of the sqlite3 shell, refused
# should a build have them).
_REFUSED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}


class _SqliteFence:
    """While in use, a raw sqlite3 connection only reads, and for at most ``timeout`` seconds.

    An authorizer allows SELECT, reading columns, recursive CTEs, functions other than
    _REFUSED_FUNCTIONS and PRAGMAs that only read; everything else (ATTACH, which would even
    create a file on a read-only connection, DETACH, CREATE/DROP/ALTER of anything, TEMP objects
    and virtual tables included, INSERT/UPDATE/DELETE, BEGIN/COMMIT/SAVEPOINT, ...) is refused
    when the statement is prepared.  A progress handler interrupts the query at the deadline.
    Both are removed on exit: the caller's own ROLLBACK must pass.
    """

    def __init__(self, raw: sqlite3.Connection, timeout: float):
        self.raw, self.timeout = raw, timeout
        self.refused: str | None = None
        self.timed_out = False

    def _authorize(self, action, arg1, arg2, _database, _trigger):
        name = _SQLITE_ACTIONS.get(action, f"action {action}")
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION:
            if (arg2 or "").lower() not in _REFUSED_FUNCTIONS:
                return sqlite3.SQLITE_OK
            name = f"function {arg2}()"
        elif action == sqlite3.SQLITE_PRAGMA:
            pragma = (arg1 or "").lower()
            if pragma in _NAME_PRAGMAS or (pragma in _READ_PRAGMAS and arg2 is None):
                return sqlite3.SQLITE_OK
            name = f"PRAGMA {arg1}" + ("" if arg2 is None else f" = {arg2}")
        elif action in _SCHEMA_WRITES and arg1 in ("sqlite_master", "sqlite_temp_master"):
            # Asked before the CREATE/DROP action itself (refused next, with a clearer name), and
            # while a table-valued PRAGMA (SELECT ... FROM pragma_table_info('t')) sets itself
            # up.  No statement can change these tables itself: SQLite refuses it without PRAGMA
            # writable_schema, which is refused above.
            return sqlite3.SQLITE_OK
        elif arg1:
            name = f"{name} {arg1}"
        self.refused = self.refused or name
        return sqlite3.SQLITE_DENY

    def _progress(self) -> int:
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return 1  # non-zero: SQLite interrupts the statement ("interrupted")
        return 0

    def __enter__(self):
        self.deadline = time.monotonic() + self.timeout
        self.busy = self.raw.execute("PRAGMA busy_timeout").fetchone()[0]
        # A reader waits for a lock only in rare cases (e.g. a WAL recovery); not past the deadline.
        self.raw.execute(f"PRAGMA busy_timeout = {min(self.busy, max(1, round(self.timeout * 1000)))}")
        self.raw.set_progress_handler(self._progress, 1000)  # every 1000 virtual machine steps
        self.raw.set_authorizer(self._authorize)
        return self

    def __exit__(self, *_exc):
        self.raw.set_authorizer(None)
        self.raw.set_progress_handler(None, 0)
        self.raw.execute(f"PRAGMA busy_timeout = {self.busy}")


@contextlib.contextmanager
def translate_errors():
    """Driver errors become StoreError with the driver's own first line."""
    try:
        yield
    except DBAPIError as exc:
        raise StoreError(f"database error: {_driver_message(exc.orig or exc)}") from exc


@dataclasses.dataclass
class ReadonlyGrant:
    """What ``grant_readonly`` did, for the operator to read."""

    relations: list[str]  # what the role may SELECT
    database: str  # the store's database
    temp_revoked: bool  # TEMPORARY on it revoked from PUBLIC (it had it)
    connect_revoked: list[str]  # other databases: CONNECT revoked from PUBLIC and the role
    kept: list[str]  # other databases the role can still connect to: --keep-connect
    not_revoked: list[str]  # ... and those where revoking did not take (not their owner)
    can_temp: bool  # the role can still create temporary tables (revoking did not take)


def grant_readonly(engine: Engine, role: str, *, password: str | None = None, login: bool = False,
                   with_log: bool = False, keep_connect: tuple[str, ...] = ()) -> ReadonlyGrant:
    """PostgreSQL: make ``role`` exist and able to SELECT the projections and views, nothing else.

    The relations granted include projection_checkpoints and alembic_version (every command's
    schema check reads the latter; `status` and `verify` also need ``with_log``: event_log,
    imported_files and projection_errors).

    PostgreSQL gives PUBLIC (every role) CONNECT and TEMPORARY on each new database; so that the
    role can neither create temporary objects nor log in elsewhere, TEMPORARY on the store's
    database is revoked from PUBLIC, and CONNECT on every other database the role could connect
    to is revoked from PUBLIC and from the role, except on databases matching a ``keep_connect``
    pattern (fnmatch).  Only a database's owner (or a superuser) can revoke on it: where that did
    not take, the result says so.  The password is never printed; a server that logs
    statements logs it, as for any ALTER ROLE.
    """
    from .schema import (PROJECTION_TABLES, VIEWS, event_log, imported_files, projection_checkpoints,
                         projection_errors)

    relations = [t.name for t in (*PROJECTION_TABLES, *VIEWS, projection_checkpoints)] + ["alembic_version"]
    if with_log:
        # projection_errors: the log rows a projection skipped, with why (`status` reads it).
        relations += [event_log.name, imported_files.name, projection_errors.name]
    with write_transaction(engine) as conn:
        quote = conn.dialect.identifier_preparer.quote
        who = quote(role)
        exists = conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
        can_login = "LOGIN" if login or password else ("" if exists else "NOLOGIN")
        conn.execute(text(f"{'ALTER' if exists else 'CREATE'} ROLE {who} "
                          f"{can_login} NOSUPERUSER NOCREATEDB NOCREATEROLE"))
        if password:
            # ALTER ROLE takes no bind parameters: let the server quote the literal.
            literal = conn.execute(text("SELECT quote_literal(:p)"), {"p": password}).scalar_one()
            conn.execute(text(f"ALTER ROLE {who} PASSWORD {literal}"))
        database = conn.execute(text("SELECT current_database()")).scalar_one()
        store_db = quote(database)
        temp_public = conn.execute(text("SELECT has_database_privilege('public', current_database(), 'TEMPORARY')")
                                   ).scalar_one()
        conn.execute(text(f"REVOKE ALL ON DATABASE {store_db} FROM {who}"))
        conn.execute(text(f"REVOKE TEMPORARY ON DATABASE {store_db} FROM PUBLIC"))
        conn.execute(text(f"GRANT CONNECT ON DATABASE {store_db} TO {who}"))
        conn.execute(text(f"REVOKE CREATE ON SCHEMA public FROM {who}"))
        conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {who}"))
        conn.execute(text(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {who}"))
        conn.execute(text(f"GRANT SELECT ON {', '.join(map(quote, relations))} TO {who}"))

        def reachable() -> list[str]:  # the other databases the role can connect to
            return conn.execute(text(
                "SELECT datname FROM pg_database WHERE datallowconn AND datname <> current_database() "
                "AND has_database_privilege(:r, oid, 'CONNECT') ORDER BY datname"), {"r": role}).scalars().all()

        before = reachable()
        kept = [d for d in before if any(fnmatch.fnmatchcase(d, p) for p in keep_connect)]
        for name in before:
            if name not in kept:
                # Without the right to (not the owner), PostgreSQL warns and changes nothing.
                conn.execute(text(f"REVOKE CONNECT ON DATABASE {quote(name)} FROM PUBLIC"))
                conn.execute(text(f"REVOKE CONNECT ON DATABASE {quote(name)} FROM {who}"))
        after = reachable()
        can_temp = conn.execute(text("SELECT has_database_privilege(:r, current_database(), 'TEMPORARY')"),
                                {"r": role}).scalar_one()
    return ReadonlyGrant(
        relations=relations, database=database, temp_revoked=temp_public and not can_temp,
        connect_revoked=[d for d in before if d not in after], kept=kept,
        not_revoked=[d for d in after if d not in kept], can_temp=can_temp)


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
    """Insert full rows (dicts keyed by column name) with one DBAPI executemany.

    The same SQL and the same per-column conversions (each column type's bind processor) that
    ``conn.execute(table.insert(), rows)`` would use, without SQLAlchemy's per-row parameter
    bookkeeping, which costs more than SQLite's own insert work (see ``workitem-store bench``).
    """
    if not rows:
        return
    dialect = conn.dialect
    key = (table.name, replace, dialect.name)
    if key not in _statements:
        compiled = _statement(table, replace, dialect).compile(
            dialect=dialect, column_keys=[c.name for c in table.columns])
        names = list(compiled.positiontup) if compiled.positional else [c.name for c in table.columns]
        processors = [table.c[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names]
        _statements[key] = (compiled.string, compiled.positional, list(zip(names, processors)))
    sql, positional, columns = _statements[key]
    if positional:
        getter = operator.itemgetter(*(n for n, _ in columns))
        convert = [(i, p) for i, (_, p) in enumerate(columns) if p]
        params = []
        for values in map(getter, rows):
            values = list(values)
            for i, p in convert:
                values[i] = p(values[i])
            params.append(tuple(values))
    else:
        params = [{n: p(row[n]) if p else row[n] for n, p in columns} for row in rows]
    conn.exec_driver_sql(sql, params)


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
    url = _parse_url(db)
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
