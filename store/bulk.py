"""Bulk writes: full rows into a table inside the caller's transaction, by the fastest path
each engine offers (SQLite: one DBAPI executemany; PostgreSQL: COPY), and the garbage collector
postponed during bulk work.
"""

from __future__ import annotations

import contextlib
import gc
import operator
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

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
        columns = list(zip(names, _processors(table, names, dialect), strict=True))
        _statements[key] = (compiled.string, compiled.positional, columns)
    sql, positional, columns = _statements[key]
    params: list[Any]
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
        _statements[key] = (sql, None, list(zip(names, _processors(table, names, dialect), strict=True)))
    sql, _, columns = _statements[key]
    dbapi = dialect.loaded_dbapi
    if not conn.in_transaction():
        conn.begin()  # as executing a statement would (autobegin): the caller's commit() commits it
    try:
        driver = conn.connection.driver_connection
        assert driver is not None  # (a connection in use always has its driver's)
        with driver.cursor() as cursor, cursor.copy(sql) as copy:
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
