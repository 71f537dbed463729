"""The bench's baselines (``store.bench``; run as steps by ``store.bench_steps``).

Baselines: the same finished rows, inserted with no work of the store's around them.

- SQLite (default): ``sqlite3.executemany`` of the rows of the appended log, read back from the
  ``append`` store (every column as stored: seq, hashes, extracted columns), into the event_log
  table of a fresh store, created by the store's own migrations: the exact schema, with its
  indexes and triggers, with the store's connection settings (WAL, 64 MiB page cache), in one
  transaction, as ``append`` commits.  The rows are read back in chunks by seq; only the inserts
  are timed.  This is the database work ``append`` cannot avoid, so ``append / raw insert`` is
  the share of the time left after the store's own work (reading, parsing, classifying,
  duplicate detection, hashing, building rows in Python, counting): 1.0 would mean the store
  costs nothing on top of its inserts.
- PostgreSQL (``--db``): ``COPY event_log FROM STDIN`` through psycopg 3 (``cursor.copy``,
  ``write_row``, text format) of the same rows into the event_log table of a fresh store, one
  transaction: the fastest way a client can load finished rows into that table.  The rows are
  first spilled from the ``append`` database to a local file in chunks (not timed), and the time
  spent loading each chunk from it is left out of the COPY's time too: the server may go on
  working on rows already sent meanwhile, so if anything the baseline looks a little faster
  than it is and the ratios come out lower.

``raw-projections`` does the same (executemany, or COPY of each value's text) with the rows the
rebuild wrote into the four projection tables, read back from the ``append`` store after the
``rebuild`` step: the database work that ``project`` and ``rebuild`` cannot avoid.  Its rate is
counted in log rows, as the rebuild's, so ``rebuild / raw insert of the projection rows it
writes`` is the share of a rebuild's time that is the database writing its rows.

``raw-chain`` is the baseline of ``verify-chain``: the same check of the chain (each payload's
SHA-256, each link's, compared with the stored ones) written as plainly as it can be, with no
store code: the rows read by seq in pages through the driver (sqlite3, psycopg), the time's text
made by the database, one process.  It counts as failed if any hash differs.
"""

from __future__ import annotations

import pickle
import sqlite3
import time
from pathlib import Path
from typing import Any

from .log import GENESIS_HASH

CHUNK = 20_000  # rows per read of the log
SQLITE_CACHE = "PRAGMA cache_size=-65536"  # as store.db sets on every connection


def _table_pages(url: str, table: str):
    """(column names, the rows of ``url``'s ``table`` as the driver reads them, in lists): what
    the baselines load (not timed).  event_log is read in pages by seq; a projection table
    (read after a rebuild: its rows, in no particular order) through a streaming cursor, on
    PostgreSQL as text (COPY's input: the driver would read jsonb as Python values)."""
    from sqlalchemy import select

    from .db import open_engine
    from .reading import pages
    from .schema import metadata

    columns = [c.name for c in metadata.tables[table].columns]  # (event_log: seq first, the pages' key)

    def read():
        engine = open_engine(url, readonly=True)
        try:
            with engine.connect() as conn:
                if table == "event_log":
                    yield from pages(conn, select(*metadata.tables[table].columns), size=CHUNK, raw=True)
                    return
                cast = "::text" if conn.dialect.name == "postgresql" else ""
                result = conn.execution_options(stream_results=True).exec_driver_sql(
                    f"SELECT {', '.join(c + cast for c in columns)} FROM {table}")
                while rows := result.fetchmany(CHUNK):
                    yield rows
        finally:
            engine.dispose()
    return columns, read()


def step_raw_sqlite(spec: dict) -> dict:
    from .db import open_store

    open_store(spec["url"]).dispose()  # the schema, by the store's own migrations
    target = sqlite3.connect(spec["url"].removeprefix("sqlite:///"), isolation_level=None)
    seconds, rows = 0.0, 0
    try:
        target.execute(SQLITE_CACHE)
        start = time.perf_counter()
        target.execute("BEGIN IMMEDIATE")  # (as the store's write transaction: locks.py)
        seconds += time.perf_counter() - start
        for table in spec["tables"]:
            columns, chunks = _table_pages(spec["source_url"], table)
            insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            try:
                for chunk in chunks:
                    start = time.perf_counter()
                    target.executemany(insert, chunk)
                    seconds += time.perf_counter() - start
                    rows += len(chunk)
            finally:
                chunks.close()
        start = time.perf_counter()
        target.execute("COMMIT")
        seconds += time.perf_counter() - start
    finally:
        target.close()
    return {"seconds": seconds, "rows": rows}


def step_raw_chain(spec: dict) -> dict:
    import hashlib

    sha256 = hashlib.sha256
    url = spec["url"]
    if url.startswith("sqlite"):
        conn: Any = sqlite3.connect(f"file:{url.removeprefix('sqlite:///')}?mode=ro", uri=True)
        conn.execute(SQLITE_CACHE)
        at, after = "replace(received_at, ' ', 'T') || 'Z'", "?"
    else:
        import psycopg

        conn = psycopg.connect(_libpq(url))
        at, after = """to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')""", "%s"
    page = (f"SELECT seq, {at}, source, payload, payload_sha256, chain_hash, duplicate_of, quarantine_reason, "
            f"kind, session FROM event_log WHERE seq > {after} ORDER BY seq LIMIT {CHUNK}")
    prev, last, rows, ok = GENESIS_HASH, 0, 0, True
    try:
        start = time.perf_counter()
        while chunk := conn.execute(page, (last,)).fetchall():
            for seq, received_at, source, payload, digest, chain, duplicate_of, reason, kind, session in chunk:
                fields = [prev, str(seq), received_at, source, digest,
                          "" if duplicate_of is None else str(duplicate_of), reason or ""]
                if kind != "notification" or session is not None:
                    fields += [kind, session or ""]
                prev = sha256("\n".join(fields).encode()).hexdigest()
                ok = ok and prev == chain and sha256(payload.encode()).hexdigest() == digest
            rows, last = rows + len(chunk), chunk[-1][0]
        seconds = time.perf_counter() - start
    finally:
        conn.close()
    return {"seconds": seconds, "rows": rows, "ok": ok}


def _libpq(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _load(spilled) -> list | None:
    try:
        return pickle.load(spilled)
    except EOFError:
        return None


def step_raw_postgresql(spec: dict) -> dict:
    import psycopg

    from .db import open_store

    open_store(spec["url"]).dispose()  # the schema, by the store's own migrations
    spills: list[tuple[str, list[str], Path]] = []
    seconds, rows = 0.0, 0
    try:
        for table in spec["tables"]:
            columns, pages = _table_pages(spec["source_url"], table)
            spills.append((table, columns, spill := Path(f"{spec['spill']}.{table}")))
            with spill.open("wb") as out:
                for page in pages:
                    pickle.dump(page, out, protocol=pickle.HIGHEST_PROTOCOL)
        with psycopg.connect(_libpq(spec["url"])) as target:
            cur = target.cursor()
            for table, columns, spill in spills:
                with spill.open("rb") as spilled:
                    start = time.perf_counter()
                    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                        seconds += time.perf_counter() - start
                        while (chunk := _load(spilled)) is not None:  # loading a chunk is not timed
                            start = time.perf_counter()
                            for row in chunk:
                                copy.write_row(row)
                            seconds += time.perf_counter() - start
                            rows += len(chunk)
                        start = time.perf_counter()  # the end of the COPY: the server's last rows
                    seconds += time.perf_counter() - start
            start = time.perf_counter()
            target.commit()
            seconds += time.perf_counter() - start
    finally:
        for _, _, spill in spills:
            spill.unlink(missing_ok=True)
    return {"seconds": seconds, "rows": rows}
