"""Shared helpers for the store tests: building notification lines, fresh stores, reading tables.

Imported as ``helpers`` (pytest puts the tests directory on sys.path).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from store.db import open_store
from store.ingest.files import import_stream
from store.schema import PROJECTION_TABLES, event_log, projection_checkpoints

PG_URL = os.environ.get("WORKITEM_STORE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MT = "WorkitemStateChangeMessage"
CHANNEL = "/v2/me/workitems"
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
    raw = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    return import_stream(engine, io.BytesIO(raw), file_name=file_name, source=source)


# -- reading -----------------------------------------------------------------------------------

def _pk_order(table):
    return [c for c in table.primary_key.columns]


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


# -- fresh databases (for hypothesis examples, which cannot use function-scoped fixtures) -------

@contextlib.contextmanager
def fresh_url(kind: str):
    """The URL of a new empty database of ``kind`` ("sqlite" or "postgresql"), removed afterwards."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{Path(tmp) / 'store.db'}"
        return
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"wis_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def fresh_store(kind: str):
    with fresh_url(kind) as url:
        engine = open_store(url)
        try:
            yield engine
        finally:
            engine.dispose()


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
