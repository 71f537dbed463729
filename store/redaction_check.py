"""The check of a redacted row (docs/RULES.md): what ``verify``, ``import`` and ``check-proof``
accept in place of a payload that hashes to its payload_sha256.

A redaction (store/redaction.py) replaces values in userData objects by MARKER and records it
in ``redactions``; the row keeps its original payload_sha256 and chain_hash.  Its payload is
accepted when the newest record of its seq holds the payload's SHA-256, the payload is JSON in
the one form a redaction writes (``redaction.serialise``: no duplicate key or other spelling
can keep a value out of sight), it still reads as the row was classified (every extracted
column and the quarantine reason as stored), and every key a record of the seq names is MARKER
wherever a userData object of the workitems that record names holds it (and at least one does).  Anything else is what
it was before redactions existed: tampering.

The records themselves are not in the hash chain: what they say of when, why and by whom is
the store's word, not the seals'.
"""

from __future__ import annotations

import functools
import json
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace

from sqlalchemy import Connection, select

from .log import payload_sha256
from .notifications import CLAIM_REFUSED, EXTRACTED, Notification, parse_timestamp, reclassify, utc_text
from .reading import select_in
from .redaction import MARKER, scoped_user_data, serialise
from .schema import event_log, redactions
from .strict_json import load_json

# A record as export and proofs carry it, and as the check reads it.
RECORD_FIELDS = ("redacted_at", "reason", "keys", "workitems", "payload_sha256", "redacted_by")
_extracted = operator.attrgetter(*EXTRACTED)
_HEX64 = re.compile(r"[0-9a-f]{64}")


def problem(payload: str, kind: str, quarantine_reason: str | None, records: Sequence[dict],
            extracted: tuple | None = None) -> str | None:
    """Why ``payload`` is not an accepted redaction of its row, given the row's ``records``
    (oldest first) and, when known, its stored extracted columns (in EXTRACTED order); None
    when it is one."""
    if not records:
        return "no redaction record"
    for record in records:
        for field in ("keys", "workitems"):
            if not isinstance(record.get(field), list) or not record[field] or \
                    not all(isinstance(k, str) for k in record[field]):
                return f"a redaction record's {field} are not a non-empty list of texts"
    if records[-1].get("payload_sha256") != payload_sha256(payload):
        return "the payload does not hash to the newest redaction record's payload_sha256"
    try:
        derived = reclassify(payload, quarantine_reason, kind)
        value = load_json(payload)
    except (ValueError, RecursionError):
        return "the payload is not JSON"
    if serialise(value) != payload:  # (no second spelling, e.g. a duplicate key, can hide a value)
        return "the payload is not in the form a redaction writes"
    if derived.quarantine_reason != quarantine_reason:
        return "the payload does not classify as the row's quarantine reason says"
    if extracted is not None and _extracted(derived) != tuple(extracted):
        return "the payload's extracted columns are not the row's"
    objects = scoped_user_data(value, kind)
    for record in records:
        for key in record["keys"]:
            holding = [o[key] for wid, o in objects if wid in record["workitems"] and key in o]
            if not holding or any(v != MARKER for v in holding):
                return f"userData key {key!r} of {', '.join(record['workitems'])} is not {MARKER} in the payload"
    return None


def read_records(conn: Connection, seqs: Iterable[int]) -> dict[int, list[dict]]:
    """The redactions records of each of ``seqs`` that has any, oldest first, as dicts of
    RECORD_FIELDS (redacted_at as 'YYYY-MM-DDTHH:MM:SS.ffffffZ', keys a list)."""
    c = redactions.c
    query = select(c.seq, c.id, *(c[name] for name in RECORD_FIELDS))
    found: dict[int, list[tuple]] = {}
    for seq, record_id, *values in select_in(conn, query, [c.seq], sorted(set(seqs))):
        found.setdefault(seq, []).append((record_id, values))
    return {seq: [_record(values) for _, values in sorted(rows, key=operator.itemgetter(0))]
            for seq, rows in found.items()}


def _record(values: list) -> dict:
    record = dict(zip(RECORD_FIELDS, values, strict=True))
    record["redacted_at"] = utc_text(record["redacted_at"])
    for field in ("keys", "workitems"):
        record[field] = _list(record[field])
    return record


def holding(conn: Connection, rows: Sequence[tuple[int, str, str | None, str]]) -> set[int]:
    """The seqs of ``rows`` ((seq, payload, quarantine_reason, kind) of log rows whose payload
    does not hash to their payload_sha256, in seq order: a chunk of verify's) whose redaction
    holds (``problem`` is None).

    The records and the extracted columns are read for the chunk's seq range (one range of each
    index), not by IN lists: after a retention run most rows of a chunk are redacted.
    """
    if not rows:
        return set()
    first, last = rows[0][0], rows[-1][0]
    r, c = redactions.c, event_log.c
    records: dict[int, list[dict]] = {}
    for seq, keys, workitems, digest in conn.execute(
            select(r.seq, r["keys"], r.workitems, r.payload_sha256)
            .where(r.seq >= first, r.seq <= last).order_by(r.seq, r.id)):
        records.setdefault(seq, []).append({"keys": _list(keys), "workitems": _list(workitems),
                                            "payload_sha256": digest})
    if not records:
        return set()
    wanted = {row[0] for row in rows} & records.keys()
    stored = {seq: tuple(values) for seq, *values in conn.execute(
        select(c.seq, *(c[name] for name in EXTRACTED)).where(c.seq >= first, c.seq <= last)) if seq in wanted}
    return {seq for seq, payload, reason, kind in rows
            if seq in wanted and problem(payload, kind, reason, records[seq], stored.get(seq)) is None}


@functools.lru_cache(maxsize=1024)
def _list(text: str) -> list | str:
    """A record's keys or workitems (JSON text) as a list, or the text when it is not JSON
    (``problem`` refuses it); the same few lists recur in the records of a retention run."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def claimed(line: str, n: Notification) -> Notification:
    """``n``, read from the input ``line``, with the line's redaction claim: an envelope that
    export wrote for a redacted row carries ``"payload_sha256"`` (the original's) and
    ``"redactions"`` (its records) beside its message.  A claim that holds (``problem``) is
    kept on the notification (``Notification.redaction``) for the log to store; one that does
    not makes the row an ordinary one, quarantined (CLAIM_REFUSED and why) unless it already is.
    A line without a claim is ``n`` as it is."""
    if n.received_at is None or '"redactions"' not in line:  # (only an envelope has received_at)
        return n
    try:
        envelope = json.loads(line)
    except (ValueError, RecursionError):
        return n
    if not isinstance(envelope, dict) or "redactions" not in envelope:
        return n
    original, records = envelope.get("payload_sha256"), envelope["redactions"]
    why = claim_malformed(original, records) or problem(n.payload, n.kind, n.quarantine_reason, records)
    if why is None:
        return replace(n, redaction=(str(original), tuple(records)))
    return n if n.quarantine_reason is not None else replace(n, quarantine_reason=f"{CLAIM_REFUSED}: {why}")


def claim_malformed(original, records) -> str | None:
    """What makes a claim not one export writes."""
    if not isinstance(original, str) or not _HEX64.fullmatch(original):
        return "its payload_sha256 is not 64 lowercase hex digits"
    if not isinstance(records, list) or not records:
        return "its redactions are not a non-empty list"
    for record in records:
        if not isinstance(record, dict) or set(record) != set(RECORD_FIELDS):
            return f"a redaction record is not an object of {', '.join(RECORD_FIELDS)}"
        if not all(isinstance(record[k], str) and record[k] for k in ("redacted_at", "reason", "redacted_by")):
            return "a redaction record's redacted_at, reason or redacted_by is not a non-empty text"
        if not isinstance(record["payload_sha256"], str) or not _HEX64.fullmatch(record["payload_sha256"]):
            return "a redaction record's payload_sha256 is not 64 lowercase hex digits"
        try:
            parse_timestamp(record["redacted_at"])
        except (ValueError, OverflowError):
            return "a redaction record's redacted_at is not a timestamp"
    return None
