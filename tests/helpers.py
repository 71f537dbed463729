"""Shared helpers for the store tests: building notification lines, new databases and stores,
the CLI, property tests on both engines, reading tables.

Imported as ``helpers`` (pytest puts the tests directory on sys.path).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import inspect
import io
import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from click.testing import Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

# conftest.py imports this module: at the top only the store's foundations (db, schema), so that
# a module being reworked breaks the tests that use it, not the loading of every test; the rest is
# imported where it is used.
from store.db import open_store
from store.gws_protocol import CHANNEL
from store.schema import PROJECTION_TABLES, event_log, projection_checkpoints

PG_URL = os.environ.get("WORKITEM_STORE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MT = "WorkitemStateChangeMessage"
UTC = dt.UTC
_ABSENT = object()


def data(ntype: str = "StatusChange", wid: str | None = "w1", *, state=_ABSENT, caps=_ABSENT,
         user_data=_ABSENT, ref=_ABSENT, code=_ABSENT, message=_ABSENT, message_type: str = MT,
         **workitem_fields) -> dict:
    """A notification's ``data``: only the keys given are present."""
    d: dict = {"messageType": message_type, "notificationType": ntype}
    if ref is not _ABSENT:
        d["referenceId"] = ref
    if code is not _ABSENT:
        d["errorCode"] = code
    if message is not _ABSENT:
        d["errorMessage"] = message
    w: dict = {}
    if wid is not None:
        w["id"] = wid
    for key, value in (("state", state), ("capabilities", caps), ("userData", user_data)):
        if value is not _ABSENT:
            w[key] = value
    w.update(workitem_fields)
    if w:
        d["workitem"] = w
    return d


def bayeux(d: dict, mid: str | None = None, channel: str = CHANNEL) -> str:
    m: dict = {"channel": channel}
    if mid is not None:
        m["id"] = mid
    m["data"] = d
    return json.dumps(m)


def bare(d: dict) -> str:
    return json.dumps({"data": d})


def envelope(message: str, source: str, received_at: dt.datetime | str) -> str:
    stamp = received_at if isinstance(received_at, str) else received_at.isoformat()
    return f'{{"received_at": {json.dumps(stamp)}, "source": {json.dumps(source)}, "message": {message}}}'


def at(seconds: float) -> dt.datetime:
    """A fixed instant plus ``seconds``."""
    return dt.datetime(2026, 11, 2, 8, 0, tzinfo=UTC) + dt.timedelta(seconds=seconds)


def feed(engine, lines, source: str = "src", file_name: str = "lines"):
    """Import text lines (str) or raw lines (bytes) as one file; returns the ImportResult."""
    from store.ingest.files import import_stream

    raw = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    return import_stream(engine, io.BytesIO(raw), file_name=file_name, source=source, force=True)  # hostile on purpose


def load_store(url: str, lines, *, project: bool = True, source: str = "agent-1") -> None:
    """Import ``lines`` into the store at ``url`` (made if need be) and, with ``project``, project them."""
    from store.projections import runner

    engine = open_store(url)
    try:
        feed(engine, lines, source=source)
        if project:
            runner.project(engine)
    finally:
        engine.dispose()


def kind_of(url: str) -> str:
    """The engine of a database URL: "sqlite" or "postgresql"."""
    return "sqlite" if url.startswith("sqlite") else "postgresql"


# -- reading -----------------------------------------------------------------------------------

def _pk_order(table):
    return [c for c in table.primary_key.columns]


def row_count(url: str, table: str) -> int:
    """SELECT COUNT(*) FROM ``table`` (a table or view) of the store at ``url``."""
    engine = open_store(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
    finally:
        engine.dispose()


def table_rows(conn, table) -> list[dict]:
    return [dict(r._mapping) for r in conn.execute(select(table).order_by(*_pk_order(table)))]


def projection_snapshot(conn) -> dict[str, list[dict]]:
    return {t.name: table_rows(conn, t) for t in PROJECTION_TABLES}


def log_rows(conn) -> list[dict]:
    return table_rows(conn, event_log)


def checkpoints(conn) -> dict[str, tuple[int, int]]:
    return {r.projection: (r.last_seq, r.version) for r in conn.execute(select(projection_checkpoints))}


def canonical(rows: list[dict]) -> list[tuple]:
    """Rows as sortable, comparable tuples (JSON values as sorted-key text)."""
    out = []
    for r in rows:
        out.append(tuple((k, json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)
                         for k, v in sorted(r.items())))
    return sorted(out, key=repr)


# -- new databases: the one way the tests make a PostgreSQL database --------------------------------

def unguard_log(conn) -> None:
    """Let ``conn``'s transaction change event_log behind the store's back, as someone with
    write access to the database can: its append-only triggers dropped (SQLite) or disabled
    (PostgreSQL)."""
    if conn.dialect.name == "sqlite":
        for name in ("event_log_no_update", "event_log_no_delete"):
            conn.execute(text(f"DROP TRIGGER IF EXISTS {name}"))
    else:
        conn.execute(text("ALTER TABLE event_log DISABLE TRIGGER USER"))


def tamper_log(target, sql: str) -> None:
    """Run ``sql`` on event_log of ``target`` (an engine or a URL) with its triggers out of the way."""
    engine = create_engine(target, poolclass=NullPool) if isinstance(target, str) else target
    try:
        with engine.begin() as conn:
            unguard_log(conn)
            conn.execute(text(sql))
    finally:
        if isinstance(target, str):
            engine.dispose()


def create_database(server_url: str, name: str, *, template: str | None = None) -> str:
    """CREATE DATABASE ``name`` (a copy of ``template`` if given) on the PostgreSQL server of
    ``server_url``; -> the new database's URL (same user and password)."""
    for plain in (name, template):
        if plain is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", plain):
            raise ValueError(f"not a plain database name: {plain!r}")
    _as_admin(server_url, f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    """DROP DATABASE ``name`` on the server of ``server_url``, whoever is still connected to it."""
    _as_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _as_admin(server_url: str, statement: str) -> None:
    # CREATE/DROP DATABASE cannot run in a transaction: autocommit; NullPool: no connection is left
    # open on the maintenance database (PostgreSQL copies a template only while nobody uses it).
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(statement))
    finally:
        admin.dispose()


@contextlib.contextmanager
def new_database(server_url: str = PG_URL, *, prefix: str = "wis_test",
                 template: str | None = None) -> Iterator[str]:
    """The URL of a new PostgreSQL database (empty, or a copy of ``template``) named
    ``<prefix>_<random>`` on the server of ``server_url``, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    url = create_database(server_url, name, template=template)
    try:
        yield url
    finally:
        drop_database(server_url, name)


@contextlib.contextmanager
def fresh_url(kind: str) -> Iterator[str]:
    """The URL of a new empty database of ``kind`` ("sqlite" or "postgresql"), removed afterwards
    (for hypothesis examples and module-scoped fixtures, which cannot use the function-scoped
    ``db_url`` fixture)."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{Path(tmp) / 'store.db'}"
        return
    with new_database() as url:
        yield url


@contextlib.contextmanager
def fresh_store(kind: str):
    """An engine on a new store (schema at head) of ``kind``, removed afterwards."""
    with fresh_url(kind) as url:
        engine = open_store(url)
        try:
            yield engine
        finally:
            engine.dispose()


# -- the command line and property tests --------------------------------------------------------

def run(*args, input: str | None = None, env: dict | None = None, ok: bool | None = True) -> Result:
    """``workitem-store ARGS`` in-process (arguments as str); ``ok``: assert it exits 0 (True) or
    not (False), or nothing (None)."""
    from click.testing import CliRunner

    from store.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], input=input, env=env, catch_exceptions=False)
    if ok is not None:
        assert (result.exit_code == 0) == ok, (args, result.exit_code, result.output)
    return result


PROPERTY_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def on_both_engines(*strategies: st.SearchStrategy, sqlite: int, postgresql: int) -> Callable[[Callable], Callable]:
    """A hypothesis property test run once per engine (the ``engine_kind`` fixture of conftest.py:
    "sqlite", then "postgresql"), with that engine's number of examples.

    ``strategies`` fill the test's last parameters (as ``@given``'s do); the others are pytest
    fixtures, set up once for all of an engine's examples (``engine_kind`` itself if the test
    wants the name; ``db_url`` and ``engine`` are of the same engine)::

        @on_both_engines(stream(), sqlite=40, postgresql=15)
        def test_x(engine_kind, generated):
            with fresh_store(engine_kind) as engine:  # a store of its own for each example
                ...
    """
    def decorate(test: Callable) -> Callable:
        signature = inspect.signature(test)
        names = list(signature.parameters)
        fixtures, drawn = names[:len(names) - len(strategies)], names[len(names) - len(strategies):]
        examples = {"sqlite": sqlite, "postgresql": postgresql}

        @functools.wraps(test)
        def run_examples(engine_kind: str, **values) -> None:
            if "engine_kind" in fixtures:
                values["engine_kind"] = engine_kind

            @settings(max_examples=examples[engine_kind], **PROPERTY_SETTINGS)
            @given(st.fixed_dictionaries(dict(zip(drawn, strategies, strict=True))))
            def example(drawn_values: dict) -> None:  # (a falsifying example prints as {name: value})
                test(**values, **drawn_values)

            example()

        # What pytest supplies: the test's fixtures, and engine_kind (the wrapper's signature, not the test's).
        kind = inspect.Parameter("engine_kind", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        run_examples.__signature__ = signature.replace(
            parameters=[kind, *(signature.parameters[n] for n in fixtures if n != "engine_kind")])
        return run_examples

    return decorate


# -- live ingest records (what store/ingest/gws.py writes), as export writes them ------------------

def marker(source: str, session: str, event: str, when: dt.datetime, **fields) -> str:
    """A session marker row as an export line."""
    payload = json.dumps({"event": event, "source": source, **fields})
    return json.dumps({"received_at": when.isoformat(), "source": source, "kind": "session",
                       "session": session, "line": payload})


def started(source: str, session: str, when: dt.datetime, handshake_at: dt.datetime | None = None) -> str:
    return marker(source, session, "started", when, handshake_at=(handshake_at or when).isoformat())


def snapshot(source: str, session: str, when: dt.datetime, workitems: list[dict], status_code: int = 0) -> str:
    """A snapshot row (GET /api/v2/me/workitems) as an export line."""
    body = json.dumps({"statusCode": status_code, "workitems": workitems})
    return json.dumps({"received_at": when.isoformat(), "source": source, "kind": "snapshot",
                       "session": session, "line": body})


def live(d: dict, source: str, session: str, when: dt.datetime) -> str:
    """A notification received live by ``session`` (no Bayeux id, as real servers send them)."""
    return json.dumps({"received_at": when.isoformat(), "source": source, "session": session,
                       "message": {"channel": CHANNEL, "data": d}})
