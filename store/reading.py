"""Reading in bounded pieces: keys looked up in IN lists of bounded length, and big tables read
in seq order a page at a time, so that neither a statement nor memory grows with the data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Integer, Select, bindparam
from sqlalchemy.exc import DBAPIError

IN_CHUNK = 900  # values per IN (...) list: well under every engine's limit on bound parameters


def chunks(values: Sequence, size: int = IN_CHUNK) -> Iterator[Sequence]:
    """``values`` in consecutive slices of at most ``size``."""
    for i in range(0, len(values), size):
        yield values[i : i + size]


def select_in(conn: Connection, query: Select, columns: Sequence, keys: Iterable) -> Iterator[Any]:
    """Run ``query`` restricted to rows whose ``columns`` (one or two) equal one of ``keys``
    (chunked), yielding rows.

    Two-column keys are asked as ``a = ? AND b IN (...)``, once per distinct ``a``: both engines
    then walk the (a, b) index.  A row-value ``(a, b) IN (...)`` made SQLite scan the whole
    table for every batch, which made incremental projection quadratic in the log.
    """
    groups: dict[tuple, list] = {}
    if len(columns) == 1:
        groups[()] = list(keys)
    else:
        for a, b in keys:
            groups.setdefault((a,), []).append(b)
    *fixed, target = columns
    for values, in_list in groups.items():
        where = [column == value for column, value in zip(fixed, values, strict=True)]
        for chunk in chunks(in_list):
            yield from conn.execute(query.where(*where, target.in_(chunk)))


def pages(conn: Connection, query: Select, after: int = 0, upto: int | None = None, size: int = 5000,
          raw: bool = False) -> Iterator[list]:
    """The rows of ``query`` whose first column (an integer key, seq) is in ``after`` < key <=
    ``upto``, in key order, in lists of at most ``size`` rows (keyset pages: each page is one
    index range scan from the last key read, however far into the table).

    Each page asks one bound and a LIMIT: PostgreSQL's generic plan (a statement executed often
    is prepared) for a range ``key > $1 AND key <= $2`` sorted every remaining row of the range
    for each page.  ``raw``: rows as the driver returns them (tuples, no result processing:
    several times faster for the hash chain's millions of rows), in the connection's
    transaction.
    """
    key = query.selected_columns[0]
    limit = bindparam("page_limit", type_=Integer)
    paged = query.where(key > bindparam("page_after", type_=Integer)).order_by(key).limit(limit)
    run = _raw_runner(conn, paged) if raw else \
        lambda last, n: list(conn.execute(paged, {"page_after": last, "page_limit": n}))
    last = after
    while upto is None or last < upto:
        n = size if upto is None else min(size, upto - last)  # (no more keys than that in the range)
        rows = run(last, n)
        if upto is not None and rows and rows[-1][0] > upto:  # (rows past rows the query filters out)
            rows = [row for row in rows if row[0] <= upto]
            if rows:
                yield rows
            return
        if not rows:
            return
        yield rows
        last = rows[-1][0]


def _raw_runner(conn: Connection, query: Select):
    """A function (after, limit) -> the rows of ``query`` read through the driver's cursor."""
    compiled = query.compile(dialect=conn.dialect)
    sql = compiled.string
    positions = compiled.positiontup if compiled.positional else None
    error = conn.dialect.loaded_dbapi.Error

    def run(after: int, limit: int) -> list:
        params: Any = compiled.construct_params({"page_after": after, "page_limit": limit})
        if positions is not None:
            params = tuple(params[name] for name in positions)
        if not conn.in_transaction():
            conn.begin()  # as a first execute would: every page reads the transaction's snapshot
        cursor = conn.connection.cursor()
        try:
            cursor.execute(sql, params)
            return list(cursor.fetchall())
        except error as exc:  # raised as SQLAlchemy raises a failed statement (callers catch DBAPIError)
            raise DBAPIError.instance(sql, params, exc, error, dialect=conn.dialect) from exc
        finally:
            cursor.close()
    return run
