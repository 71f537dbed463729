"""Anyone's SQL, fenced in: `workitem-store query` and the PostgreSQL role it runs as.

``run_query`` runs one statement that can only read, for at most ``timeout`` seconds, on both
engines; ``grant_readonly`` makes a PostgreSQL role that passes its check.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import sqlite3
import time

from sqlalchemy import Connection, Engine, bindparam, text

from .db import StoreError, ensure_schema, parse_url, run_sql, translate_errors, write_transaction
from .schema import (
    PROJECTION_TABLES,
    VIEWS,
    event_log,
    event_log_counts,
    imported_files,
    projection_checkpoints,
    projection_errors,
    redactions,
    seals,
    store_identity,
)


def url_as(db: str | None, role: str, password: str | None = None) -> str:
    """The PostgreSQL URL of ``db`` (--db as the CLI takes it) with ``role`` (and ``password``)
    as its user: a login of its own, not SET ROLE (which a statement could undo)."""
    url = parse_url(db)
    if url.get_backend_name() != "postgresql":
        raise StoreError("--as is for PostgreSQL; a SQLite file has no roles")
    return url.set(username=role, password=password).render_as_string(hide_password=False)


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
    raw = conn.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)  # (the store's SQLite engines use the stdlib driver)
    with _SqliteFence(raw, timeout) as fence:
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
    """PostgreSQL: make ``role`` exist and able to SELECT the projections and views, nothing else
    (the schema created first in an empty database; StoreError on SQLite, which has no roles).

    The relations granted include projection_checkpoints and alembic_version (every command's
    schema check reads the latter; `status` and `verify` also need ``with_log``: event_log,
    event_log_counts, imported_files, projection_errors, redactions, seals and store_identity).

    PostgreSQL gives PUBLIC (every role) CONNECT and TEMPORARY on each new database; so that the
    role can neither create temporary objects nor log in elsewhere, TEMPORARY on the store's
    database is revoked from PUBLIC, and CONNECT on every other database the role could connect
    to is revoked from PUBLIC and from the role, except on databases matching a ``keep_connect``
    pattern (fnmatch).  Only a database's owner (or a superuser) can revoke on it: where that did
    not take, the result says so.  The password is never printed; a server that logs
    statements logs it, as for any ALTER ROLE.
    """
    if engine.dialect.name != "postgresql":  # before anything is created at a SQLite path
        raise StoreError("grant-readonly is for PostgreSQL; SQLite query commands open the file read-only")
    ensure_schema(engine)
    relations = [t.name for t in (*PROJECTION_TABLES, *VIEWS, projection_checkpoints)] + ["alembic_version"]
    if with_log:
        # projection_errors: the log rows a projection skipped, with why (`status` reads it).
        relations += [t.name for t in (event_log, event_log_counts, imported_files, projection_errors, redactions,
                                       seals, store_identity)]
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
            return list(conn.execute(text(
                "SELECT datname FROM pg_database WHERE datallowconn AND datname <> current_database() "
                "AND has_database_privilege(:r, oid, 'CONNECT') ORDER BY datname"), {"r": role}).scalars())

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
