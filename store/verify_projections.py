"""Checking the projections: every projection table against the rows a rebuild from the log
gives, compared as two key-ordered streams (memory does not grow with the tables).

A difference is reported by primary key, as the store has the row and as the log says it should
be (a rebuild's row), with the values as they are (None for NULL): the CLI words them.
"""

from __future__ import annotations

import json
import operator
import tempfile
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Connection, Dialect, String, Table, select

from .db import open_store, write_transaction
from .projections import PROJECTIONS, runner

Row = tuple  # a table row: the stored values (SQLite, as the driver reads them) or the natural ones


def _json_text(value) -> str:
    """A JSON value as text that compares by meaning: keys sorted, numbers by value.

    PostgreSQL's jsonb keeps a number's value, not its spelling: 1e300 written from Python comes
    back as a 301-digit integer, equal in value to the 1e300 a rebuild computes.
    """
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_json_text(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(_json_text, value)) + "]"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        return str(number.normalize()) if number else "0"
    return json.dumps(value)


def compare_projections(conn: Connection, checkpoints: dict[str, tuple[int, int]],
                        examples: int = 3) -> tuple[dict[str, dict], list[dict]]:
    """Compare every projection table with the rows a rebuild from the log gives at its
    checkpoint (``checkpoints``: {projection: (last_seq, kept row count)}).

    Returns (differences, counts that disagree).  ``differences``: {table: {"checkpoint",
    "missing": rows a rebuild has that the table lacks, "unexpected": the reverse (a key in both
    with different rows counts once in each), "pairs": up to ``examples`` differing keys, each
    {"key": {column: value}, "store": the row the table has or None, "log": the row a rebuild
    gives or None}}}; a row is
    {column: value}, NULL as None.  Counts: {"table": "projection_checkpoints", "projection",
    "counted": rows in the table, "recorded": its checkpoint's count} where they differ.

    The rebuild runs into a scratch SQLite store in a temporary directory ($TMPDIR; it needs
    about the space of the projection tables), step by step as ``rebuild`` does, so memory does
    not grow with the log; then each table and its rebuilt twin are read in primary-key order
    and compared as two sorted streams.  A SQLite store's rows are compared as stored (the
    driver's values), and only rows that differ so are compared again as their canonical form.
    """
    raw = conn.dialect.name == "sqlite"  # both sides SQLite: the stored values compare as they are
    differences: dict[str, dict] = {}
    counts: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="workitem-store-verify-") as tmp:
        scratch = open_store(f"sqlite:///{Path(tmp) / 'rebuilt.db'}")
        try:
            reached = 0
            for upto in sorted({seq for seq, _ in checkpoints.values()}):
                with write_transaction(scratch) as rebuilt:
                    runner.replay(rebuilt, reached, upto, source=conn)
                reached = upto
                with scratch.connect() as rebuilt:
                    for cls in PROJECTIONS:
                        seq, recorded = checkpoints[cls.name]
                        if seq != upto:
                            continue
                        natural = _natural(cls.table, scratch.dialect) if raw else (lambda row: row)
                        diff, found = _compare_table(cls.table, _sorted_rows(rebuilt, cls.table, raw),
                                                     _sorted_rows(conn, cls.table, raw), natural, examples)
                        if diff:
                            differences[cls.table.name] = {"checkpoint": upto, **diff}
                        if found != recorded:
                            counts.append({"table": "projection_checkpoints", "projection": cls.name,
                                           "counted": found, "recorded": recorded})
        finally:
            scratch.dispose()
    return differences, counts


def _sorted_rows(conn: Connection, table: Table, raw: bool = False) -> Iterator[tuple[Any, Row]]:
    """(primary key, row) of every row, in primary-key order as Python orders the keys (text by
    code point: SQLite's BINARY, PostgreSQL's "C" collation), streamed.  ``raw`` (SQLite): the
    row as the driver reads it; else as the column types read it."""
    columns = [col.name for col in table.columns]
    key_at = [columns.index(col.name) for col in table.primary_key.columns]
    key_of = operator.itemgetter(*key_at)  # (a value, not a 1-tuple, for a one-column key: on both sides)
    if raw:
        quote = conn.dialect.identifier_preparer.quote
        cursor = conn.connection.cursor()
        cursor.execute(f"SELECT {', '.join(map(quote, columns))} FROM {quote(table.name)} "
                       f"ORDER BY {', '.join(quote(columns[i]) for i in key_at)}")
        while rows := cursor.fetchmany(5000):
            yield from ((key_of(row), row) for row in rows)
        return
    order = [col.collate("C") if conn.dialect.name == "postgresql" and isinstance(col.type, String) else col
             for col in table.primary_key.columns]
    for row in conn.execution_options(yield_per=5000).execute(select(table).order_by(*order)):
        yield key_of(row), tuple(row)


def _natural(table: Table, dialect: Dialect) -> Callable[[Row], Row]:
    """A function from a row of ``table`` as the SQLite driver reads it to the row as the column
    types read it (JSON decoded, timestamps as datetimes)."""
    processors = [col.type.dialect_impl(dialect).result_processor(dialect, None) for col in table.columns]

    def natural(row: Row) -> Row:
        return tuple(value if p is None or value is None else p(value)
                     for value, p in zip(row, processors, strict=True))
    return natural


def _canonical(table: Table) -> Callable[[Row], Row]:
    """A function from a natural row to a form that compares by meaning (JSON by ``_json_text``)."""
    json_at = {i for i, col in enumerate(table.columns) if isinstance(col.type, JSON)}

    def canonical(row: Row) -> Row:
        return tuple(_json_text(v) if i in json_at and v is not None else v for i, v in enumerate(row))
    return canonical


def _compare_table(table: Table, expected: Iterator, found: Iterator, natural: Callable[[Row], Row],
                   examples: int) -> tuple[dict | None, int]:
    """Merge two key-ordered streams of (key, row): ``expected`` (the rebuild's) and ``found``
    (the store's).  Returns (the differences, or None; how many rows ``found`` had).  Rows
    that differ as read are compared again as canonical rows (``natural``, then
    ``_canonical``)."""
    columns = [col.name for col in table.columns]
    keys = [col.name for col in table.primary_key.columns]
    canonical = _canonical(table)
    diff: dict = {"missing": 0, "unexpected": 0, "pairs": []}

    def as_dict(row: Row | None) -> dict | None:
        return None if row is None else dict(zip(columns, natural(row), strict=True))

    def note(key, log_row: Row | None, store_row: Row | None) -> None:
        diff["missing"] += log_row is not None
        diff["unexpected"] += store_row is not None
        if len(diff["pairs"]) < examples:
            key_values = key if len(keys) > 1 else (key,)
            diff["pairs"].append({"key": dict(zip(keys, key_values, strict=True)),
                                  "store": as_dict(store_row), "log": as_dict(log_row)})

    count = 0
    e, f = next(expected, None), next(found, None)
    while True:
        if e is not None and (f is None or e[0] < f[0]):  # only the log has the key
            note(e[0], e[1], None)
            e = next(expected, None)
        elif f is not None and (e is None or f[0] < e[0]):  # only the store has it
            count += 1
            note(f[0], None, f[1])
            f = next(found, None)
        elif e is not None and f is not None:  # both have it
            count += 1
            if e[1] != f[1] and canonical(natural(e[1])) != canonical(natural(f[1])):
                note(e[0], e[1], f[1])
            e, f = next(expected, None), next(found, None)
        else:
            break
    return (diff if diff["missing"] or diff["unexpected"] else None), count

