"""Erasure: the values of userData keys in stored payloads replaced by a marker, each change
recorded (docs/RULES.md).

The only writer of ``redactions`` and the only code that changes ``event_log.payload``: the
triggers of migration 0008 let an UPDATE change the payload alone, to a text whose SHA-256 the
newest redactions row of that seq holds.  payload_sha256 and chain_hash keep their original
values, so the chain and every seal still verify; ``verify`` checks a redacted payload against
its records instead.

Where userData lives: a notification's message (a Bayeux message or a bare ``{data}``) at
``data.workitem.userData``; a snapshot's ``workitems[i].userData``.  Only JSON objects are
redacted: each chosen key stays, its value becomes MARKER.
"""

from __future__ import annotations

import datetime as dt
import functools
import getpass
import json
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, Select, func, or_, select, text

from .db import snapshot, text_sha256, write_transaction
from .errors import StoreError
from .locks import LOCK_TIMEOUT, lock_checkpoints, lock_for_append
from .notifications import MAX_DEPTH, NOTIFICATION, SNAPSHOT, as_text, snapshot_workitems
from .reading import pages
from .schema import event_log, redactions
from .strict_json import load_json, too_deep

MARKER = "[REDACTED]"
_SURROGATE = re.compile("[\ud800-\udfff]")  # (json.dumps writes a lone one raw: not UTF-8)


def scoped_user_data(message: Any, kind: str) -> list[tuple[str, dict]]:
    """The userData objects of a parsed payload of ``kind``, each with the id (as text; "" when
    it has none) of the workitem it belongs to (none for other kinds, or where a userData is not
    an object)."""
    if not isinstance(message, dict):
        return []
    if kind == NOTIFICATION:
        data = message.get("data")
        workitems = [data.get("workitem")] if isinstance(data, dict) else []
    elif kind == SNAPSHOT and isinstance(message.get("workitems"), list):
        workitems = message["workitems"]
    else:
        return []
    return [(as_text(w.get("id")) or "", w["userData"]) for w in workitems
            if isinstance(w, dict) and isinstance(w.get("userData"), dict)]


def user_data_objects(message: Any, kind: str) -> list[dict]:
    """The userData objects of a parsed payload of ``kind`` (see ``scoped_user_data``)."""
    return [user_data for _, user_data in scoped_user_data(message, kind)]


def parse(payload: str, kind: str) -> Any | None:
    """The payload's JSON value, or None when it cannot hold userData (another kind, no
    "userData" in its text, nested too deep to parse safely, not JSON)."""
    if kind not in (NOTIFICATION, SNAPSHOT):
        return None
    if '"userData"' not in payload and "\\" not in payload:  # (a key may be spelt with \\u escapes)
        return None
    if too_deep(payload, MAX_DEPTH + 1):
        return None
    try:
        return load_json(payload)
    except (ValueError, RecursionError):
        return None


def redact_value(message: Any, kind: str, keys: Collection[str] | None,
                 workitems: Collection[str] | None = None) -> tuple[list[str], bool, list[str]]:
    """Replace, in place, the values of ``keys`` (None: every key) in the userData objects of
    ``message`` that belong to ``workitems`` (None: all of them) by MARKER; (sorted keys whose
    value changed, whether a chosen key already held MARKER, sorted workitems whose userData
    changed)."""
    changed: set[str] = set()
    changed_workitems: set[str] = set()
    already = False
    for workitem, user_data in scoped_user_data(message, kind):
        if workitems is not None and workitem not in workitems:
            continue
        for key in (list(user_data) if keys is None else [k for k in keys if k in user_data]):
            if user_data[key] == MARKER:
                already = True
            else:
                user_data[key] = MARKER
                changed.add(key)
                changed_workitems.add(workitem)
    return sorted(changed), already, sorted(changed_workitems)


def serialise(message: Any) -> str:
    """The payload text of a redacted message (lone surrogates, which only \\u escapes can
    spell in UTF-8, written as escapes)."""
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    if _SURROGATE.search(text):
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


def redact_payload(payload: str, kind: str, keys: Collection[str] | None,
                   workitems: Collection[str] | None = None) -> tuple[str, list[str], list[str]] | None:
    """``payload`` with the values of ``keys`` (None: every key) in the userData of
    ``workitems`` (None: every userData) replaced by MARKER: (the new payload text, the sorted
    keys whose value changed, the sorted workitems whose userData changed), or None when nothing
    changes (already redacted, no such key, no userData object, not JSON)."""
    message = parse(payload, kind)
    if message is None:
        return None
    changed, _, changed_workitems = redact_value(message, kind, keys, workitems)
    if not changed:
        return None
    return serialise(message), changed, changed_workitems


INGEST_REASON = "redacted at ingest"  # the reason of the redactions made before a row is first written


def at_ingest(payload: str, kind: str, keys: Collection[str], redacted_by: str,
              now: dt.datetime) -> tuple[str, dict] | None:
    """Redaction at ingest: ``payload`` with the values of ``keys`` replaced before it is first
    written, and its record (redacted_at ``now``, without seq); None when nothing changes."""
    changed = redact_payload(payload, kind, keys)
    if changed is None:
        return None
    text, changed_keys, workitems = changed
    return text, {"redacted_at": now, "reason": INGEST_REASON, "keys": changed_keys, "workitems": workitems,
                  "payload_sha256": text_sha256(text), "redacted_by": redacted_by}


def record(conn: Connection, rows: list[dict]) -> None:
    """Insert redactions rows, in the caller's transaction: each a dict of seq, redacted_at (an
    aware datetime), reason, keys and workitems (lists), payload_sha256 (of the payload after
    it) and redacted_by."""
    if rows:
        conn.execute(redactions.insert(), [
            {"seq": r["seq"], "redacted_at": r["redacted_at"], "reason": r["reason"],
             "keys": json_list(r["keys"]), "workitems": json_list(r["workitems"]),
             "payload_sha256": r["payload_sha256"], "redacted_by": r["redacted_by"]}
            for r in rows])


def json_list(values: Collection[str]) -> str:
    """A record's keys or workitems as stored: a JSON array, sorted."""
    return _json_list(tuple(sorted(values)))


@functools.lru_cache(maxsize=4096)  # (a retention run repeats the same few lists in every record)
def _json_list(values: tuple[str, ...]) -> str:
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"))


def redactor(engine: Engine) -> str:
    """``database_user`` without a connection (the spool redacts while the database is down):
    the URL's user on PostgreSQL, the OS login name on SQLite."""
    if engine.dialect.name == "postgresql" and engine.url.username:
        return engine.url.username
    return _login_name()


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # (no login name in the environment nor the password database)
        return f"uid {os.getuid()}"


def database_user(conn: Connection) -> str:
    """Who redacts: PostgreSQL's current_user; on SQLite (no users), the OS login name."""
    if conn.dialect.name == "postgresql":
        return str(conn.exec_driver_sql("SELECT current_user").scalar_one())
    return _login_name()


# -- forget: select, redact, record, refresh ---------------------------------------------------

CHUNK = 10_000  # log rows redacted per transaction (bounded WAL, ~10 MB; an interruption keeps whole chunks)


@dataclass(frozen=True)
class Selection:
    """Which log rows ``forget`` redacts: all the criteria given hold (at least one)."""

    workitems: tuple[str, ...] = ()  # rows of these workitems (notifications; snapshots listing one)
    user_data: tuple[str, str] | None = None  # rows with a userData holding KEY with VALUE (as text)
    received_before: dt.datetime | None = None

    def __post_init__(self):
        if not self.workitems and self.user_data is None and self.received_before is None:
            raise StoreError("forget needs a selection: --workitem, --user-data or --received-before")


@dataclass
class ForgetResult:
    redacted: int = 0  # rows changed by this run
    already: int = 0  # selected rows whose chosen keys all held the marker already
    workitems: set[str] = field(default_factory=set)  # workitems whose user_data was refreshed
    planned: list[dict] = field(default_factory=list)  # dry run: {seq, kind, workitems, keys}
    # SQLite, after a run that changed rows: whether the WAL (which may still hold pages with the
    # clear values) was checkpointed and emptied; False when a reader kept it (run again later).
    wal_cleared: bool | None = None


def forget(engine: Engine, selection: Selection, reason: str, keys: Collection[str] | None = None, *,
           dry_run: bool = False, chunk: int = CHUNK,
           after_chunk: Callable[[ForgetResult], None] | None = None) -> ForgetResult:
    """Redact the selected rows: in each, the values of ``keys`` (None: every key) of every
    userData object become MARKER, recorded in ``redactions``; then refresh workitems.user_data
    of the workitems concerned.  Each transaction (``chunk`` rows changed) holds whole rows
    with their records and refreshes, so an interrupted run leaves whole rows only and running
    again finishes it (rows already redacted change nothing).  ``dry_run``: change nothing, list
    in ``planned`` what would change.  ``after_chunk`` is called after each commit."""
    if not reason.strip():
        raise StoreError("forget needs a --reason")
    result = ForgetResult()
    with snapshot(engine) as conn:
        upto = conn.execute(select(func.coalesce(func.max(event_log.c.seq), 0))).scalar_one()
    query = _candidates(selection)
    after = 0
    while after < upto:
        if dry_run:
            with snapshot(engine) as conn:
                after, changes = _scan(conn, query, selection, keys, after, upto, chunk, result)
            result.planned += [{k: v for k, v in c.items() if k != "payload"} for c in changes]
            continue
        with write_transaction(engine) as conn:
            if conn.dialect.name == "sqlite":  # the space of the clear values is zeroed, not just freed
                conn.exec_driver_sql("PRAGMA secure_delete = ON")
            lock_for_append(conn)  # (appenders' lock, then the projectors': as an ingest that projects)
            lock_checkpoints(conn)
            after, changes = _scan(conn, query, selection, keys, after, upto, chunk, result)
            if changes:
                _write(conn, changes, reason, result)
        if changes and after_chunk is not None:
            after_chunk(result)
    if result.redacted and engine.dialect.name == "sqlite":
        with engine.connect() as conn:  # copies the zeroed pages into the file, then empties the WAL
            conn.exec_driver_sql("PRAGMA busy_timeout = 1000")  # (waits for readers: not for long)
            try:
                busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()[0]
            finally:
                conn.exec_driver_sql(f"PRAGMA busy_timeout = {round(LOCK_TIMEOUT * 1000)}")
        result.wal_cleared = not busy
    return result


def _candidates(selection: Selection) -> Select:
    """The log rows that may match (the text tests are cheap prefilters; ``_matches`` decides)."""
    c = event_log.c
    where: list[ColumnElement[bool]] = [
        or_(c.kind == NOTIFICATION, c.kind == SNAPSHOT),
        or_(c.payload.contains('"userData"'), c.payload.contains("\\", autoescape=True)),  # as ``parse``
    ]
    if selection.received_before is not None:
        where.append(c.received_at < selection.received_before)
    if selection.workitems:
        where.append(or_(c.kind == SNAPSHOT, *(c.workitem_id == w for w in selection.workitems)))
    if selection.user_data is not None:
        value = selection.user_data[1]
        if not _may_be_spelt_otherwise(value):  # (escapes are found by the backslash)
            where.append(or_(c.payload.contains(value, autoescape=True), c.payload.contains("\\", autoescape=True)))
    return select(c.seq, c.kind, c.workitem_id, c.payload).where(*where)


def _may_be_spelt_otherwise(value: str) -> bool:
    """True when JSON may spell a value whose text is ``value`` without that text (a number:
    1.0 as 1.00 or 1e0; an object or array: with other spaces)."""
    try:
        float(value)
    except ValueError:
        return value.startswith(("{", "[")) or value != value.strip()
    return True


def _scan(conn: Connection, query: Select, selection: Selection, keys: Collection[str] | None,
          after: int, upto: int, chunk: int, result: ForgetResult) -> tuple[int, list[dict]]:
    """Read candidates after ``after`` until ``chunk`` of them need a change (or ``upto``):
    (the last seq read, the changes: seq, kind, workitems, keys, payload)."""
    changes: list[dict] = []
    for rows in pages(conn, query, after, upto, max(chunk, 500)):
        for seq, kind, workitem_id, payload in rows:
            after = seq
            message = parse(payload, kind)
            if message is None or not _matches(message, kind, workitem_id, selection):
                continue
            changed, already, workitems = redact_value(message, kind, keys, _scope(message, kind, selection))
            if not changed:
                result.already += already
                continue
            changes.append({"seq": seq, "kind": kind, "workitems": workitems, "keys": changed,
                            "payload": serialise(message)})
            if len(changes) >= chunk:
                return after, changes
    return upto, changes


def _matches(message: Any, kind: str, workitem_id: str | None, selection: Selection) -> bool:
    if selection.workitems and workitem_id not in selection.workitems and not (
            kind == SNAPSHOT and not _listed(message).keys().isdisjoint(selection.workitems)):
        return False
    if selection.user_data is not None:
        key, value = selection.user_data
        return any(key in u and as_text(u[key]) == value for u in user_data_objects(message, kind))
    return True


def _scope(message: Any, kind: str, selection: Selection) -> set[str] | None:
    """The workitems whose userData a selected row's redaction changes: those the selection
    names (by --workitem, and by --user-data those whose userData holds the value), so that a
    snapshot listing other workitems keeps their userData; None (all) for --received-before alone."""
    scope: set[str] | None = set(selection.workitems) if selection.workitems else None
    if selection.user_data is not None:
        key, value = selection.user_data
        holding = {wid for wid, u in scoped_user_data(message, kind) if key in u and as_text(u[key]) == value}
        scope = holding if scope is None else scope & holding
    return scope


def _listed(message: Any) -> dict[str, dict]:
    """The workitems a snapshot's payload lists (none when it is not a snapshot body)."""
    ok = isinstance(message, dict) and isinstance(message.get("workitems"), list)
    return snapshot_workitems(message) if ok else {}


def _write(conn: Connection, changes: list[dict], reason: str, result: ForgetResult) -> None:
    """Record and apply ``changes`` (records first: the trigger checks the newest one), then
    refresh the workitems they concern."""
    # (imported here: log.py, which the projections import, imports this module's API)
    from .projections.workitems import refresh_user_data

    now, user = dt.datetime.now(dt.UTC), database_user(conn)
    for change in changes:
        change["payload_sha256"] = text_sha256(change["payload"])
    record(conn, [{"seq": ch["seq"], "redacted_at": now, "reason": reason, "keys": ch["keys"],
                   "workitems": ch["workitems"], "payload_sha256": ch["payload_sha256"], "redacted_by": user}
                  for ch in changes])
    conn.execute(text("UPDATE event_log SET payload = :payload WHERE seq = :seq"),
                 [{"payload": ch["payload"], "seq": ch["seq"]} for ch in changes])
    result.redacted += len(changes)
    changed_from: dict[str, int] = {}
    for change in changes:  # (in seq order: the first is the least)
        for wid in change["workitems"]:
            if wid:  # (a userData of a snapshot entry without an id: no workitems row)
                changed_from.setdefault(wid, change["seq"])
    result.workitems.update(refresh_user_data(conn, changed_from))
