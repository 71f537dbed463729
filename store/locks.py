"""Who writes when: every lock the store takes, how long a writer waits for one, and what it
says when it gives up.

Writers take turns; readers never wait for them (SQLite's WAL, PostgreSQL's MVCC).

- SQLite allows one writer per file.  A write transaction (``db.write_transaction``) begins
  with BEGIN IMMEDIATE, which takes the file's write lock before the first read (the log's head):
  with a plain BEGIN the lock would come at the first write, after two appenders could have read
  the same head.  So on SQLite every lock below is already held, and the functions do nothing.
- PostgreSQL runs writers side by side; each serialises on what it must: appenders on event_log
  (``lock_for_append``), projectors on projection_checkpoints (``lock_checkpoints``), sealers on
  seals (``lock_seals``), schema upgrades on an advisory lock (``lock_upgrade``).

On both engines a writer waits at most LOCK_TIMEOUT for a lock (SQLite's busy_timeout,
PostgreSQL's lock_timeout, set on each write transaction; a shorter wait can be asked for), then
gives up with ``StoreLocked``: "the store is locked by another writer for more than 60 s: ...".
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from .errors import StoreLocked, driver_message

LOCK_TIMEOUT = 60.0  # seconds a writer waits for a lock before it gives up, on both engines
_WRITER = "workitem_store_writer"  # Connection.info key: the lock wait of the transaction to begin
# Any fixed number: the key of the PostgreSQL advisory lock that serialises schema upgrades.
_UPGRADE_LOCK_KEY = 0x5717E
_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE when lock_timeout (or NOWAIT) gives up


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def on_sqlite_connect(dbapi_connection: sqlite3.Connection) -> None:
    """Every SQLite connection waits up to LOCK_TIMEOUT for a lock (sqlite3's own default: 5 s)."""
    dbapi_connection.execute(f"PRAGMA busy_timeout={_ms(LOCK_TIMEOUT)}")


def mark_writer(conn: Connection, timeout: float = LOCK_TIMEOUT) -> None:
    """The next transaction of ``conn`` writes, waiting at most ``timeout`` seconds for a lock."""
    conn.info[_WRITER] = timeout


def on_sqlite_begin(conn: Connection) -> None:
    """BEGIN a SQLite transaction: IMMEDIATE (the write lock, waited for) for a marked writer."""
    timeout = conn.info.pop(_WRITER, None)
    if timeout is None:
        conn.exec_driver_sql("BEGIN")
        return
    if timeout == LOCK_TIMEOUT:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        return
    conn.exec_driver_sql(f"PRAGMA busy_timeout={_ms(timeout)}")
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # (the only wait of a WAL writer: commits do not wait)
    finally:
        conn.exec_driver_sql(f"PRAGMA busy_timeout={_ms(LOCK_TIMEOUT)}")


def on_postgresql_begin(conn: Connection) -> None:
    """Bound every lock wait of a marked writer's transaction (just begun) by its timeout."""
    timeout = conn.info.pop(_WRITER, None)
    if timeout is not None:
        conn.execute(text(f"SET LOCAL lock_timeout = '{_ms(timeout)}ms'"))


@contextlib.contextmanager
def given_up(timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """A lock wait that ran out (SQLite: "database is locked"; PostgreSQL: lock_timeout)
    becomes StoreLocked; other errors pass."""
    try:
        yield
    except DBAPIError as exc:
        orig = exc.orig
        busy = isinstance(orig, sqlite3.OperationalError) and \
            (getattr(orig, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY
        if not busy and getattr(orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
            raise
        raise StoreLocked(f"the store is locked by another writer for more than {timeout:g} s: "
                          f"{driver_message(orig or exc)}") from exc


def lock_for_append(conn: Connection) -> None:
    """Serialise appenders so that seq order is commit order.

    PostgreSQL: an EXCLUSIVE table lock (readers still read) held to commit; the next writer reads
    the head only after this one committed, so no reader ever sees seq N+1 while N is in flight.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("LOCK TABLE event_log IN EXCLUSIVE MODE"))


def lock_checkpoints(conn: Connection) -> None:
    """Make projectors take turns: each reads the checkpoints, applies the log past them and
    writes them back (PostgreSQL: a table lock on projection_checkpoints)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("LOCK TABLE projection_checkpoints IN EXCLUSIVE MODE"))


def lock_seals(conn: Connection) -> None:
    """Seals are numbered: sealers take turns (PostgreSQL: a table lock on seals)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("LOCK TABLE seals IN EXCLUSIVE MODE"))


def lock_upgrade(conn: Connection) -> None:
    """Two processes initialising one empty database must not both create tables (PostgreSQL:
    an advisory lock, as there may be no table to lock yet)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _UPGRADE_LOCK_KEY})
