"""From a raw input line to a typed notification, and the rules that quarantine one.

Pure functions, no database.  Three line shapes are accepted (see docs/RULES.md):

1. an envelope ``{"received_at": ..., "source": ..., "message": <Bayeux message>}`` (or, for a row
   whose payload is a whole input line that was not a message, ``"line": "<that line>"``);
2. a Bayeux message ``{"channel": ..., "id": ..., "data": {...}}``;
3. a bare ``{"data": {...}}``.

The payload kept in the log is the message's own text exactly as it appears in the line: for an
envelope that is the raw text of its ``message`` value, found by scanning the envelope's
top-level keys (so re-importing an export reproduces the payload byte for byte).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, replace
from typing import Any

import orjson

from .strict_json import has_long_number, load_json, object_spans, scan_string, too_deep

MESSAGE_TYPE = "WorkitemStateChangeMessage"
# What a log row is (event_log.kind): a notification, or one of the records live ingest adds so
# that an auditor can judge completeness: a session marker (a CometD session started, was lost,
# resumed or ended) or a snapshot (the agent's workitems read after a handshake).
NOTIFICATION, SESSION, SNAPSHOT = "notification", "session", "snapshot"
KINDS = (NOTIFICATION, SESSION, SNAPSHOT)
SESSION_EVENTS = ("started", "resumed", "lost", "ended", "snapshot-failed")
STATUS_CHANGE, PROPERTIES_UPDATED, ERROR = "StatusChange", "PropertiesUpdated", "Error"
NOTIFICATION_TYPES = (STATUS_CHANGE, PROPERTIES_UPDATED, ERROR)
# Quarantine reasons whose payload is the whole input line rather than a message.
LINE_REASONS = ("not JSON", "not a JSON object", "not UTF-8", "envelope")
# ... and of those, the reasons decided on the raw bytes, which the stored text cannot show again.
NOT_UTF8, HAS_NUL = "not UTF-8 text", "not JSON: contains NUL characters"
RAW_REASONS = (NOT_UTF8, HAS_NUL)
CLAIM_REFUSED = "redaction claim does not hold"  # an export line's claim, refused on import (redaction_check)
# Limits that keep every accepted row storable and indexable on both engines (docs/RULES.md 1.4).
MAX_DEPTH = 128  # arrays and objects nested in a payload
MAX_KEY_BYTES = 512  # UTF-8 bytes of an indexed key (PostgreSQL's btree entries hold ~2,700)
TOO_DEEP = f"not JSON: nested deeper than {MAX_DEPTH} levels"
# received_at must be an instant every engine and every session time zone can show (one day
# inside Python's years 1 to 9999, so that no UTC offset carries it out of range).
MIN_TIME = dt.datetime(1, 1, 2, tzinfo=dt.UTC)
MAX_TIME = dt.datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=dt.UTC)
# The event_log columns read out of a payload (besides the quarantine reason).
EXTRACTED = ("channel", "message_id", "message_type", "notification_type", "workitem_id", "reference_id")

UNSTORABLE = "not JSON: a string holds \\u0000 or an unpaired surrogate (not storable)"
UNSTORABLE_CHARS = re.compile("[\x00\ud800-\udfff]")  # NUL, or a surrogate left unpaired by a \u escape


def too_long(key: str | None) -> bool:
    """True when ``key`` has more than MAX_KEY_BYTES bytes of UTF-8 (too long to index)."""
    return (key is not None and len(key) * 4 > MAX_KEY_BYTES
            and len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES)


@dataclass(slots=True)
class Notification:
    """One input line, classified.  ``quarantine_reason`` is None for a projectable message.
    Immutable by convention (copies: ``replace``); frozen, its constructor cost 3 µs more a line."""

    payload: str
    received_at: dt.datetime | None  # from an envelope; None means "when it was read"
    source: str | None  # from an envelope; None means "the reader's source"
    channel: str | None
    message_id: str | None
    message_type: str | None
    notification_type: str | None
    workitem_id: str | None
    reference_id: str | None
    quarantine_reason: str | None
    kind: str = NOTIFICATION
    session: str | None = None  # the live session that received it (envelope "session" on import)
    redaction: tuple[str, tuple[dict, ...]] | None = None  # a checked claim: (original payload_sha256, records)


def as_text(value: Any) -> str | None:
    """A scalar as the text the log stores (referenceId 8 -> '8'); None for null/absent."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def parse_timestamp(value: Any) -> dt.datetime:
    """ISO-8601 to an aware UTC datetime; a value without offset is taken as UTC."""
    if not isinstance(value, str):
        raise ValueError(f"timestamp must be an ISO-8601 string, got {value!r}")
    parsed = dt.datetime.fromisoformat(value)
    try:
        at = parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)
    except OverflowError:
        at = None
    if at is None or not MIN_TIME <= at <= MAX_TIME:
        raise ValueError(f"{value} is out of range (UTC {utc_text(MIN_TIME)[:10]} to {utc_text(MAX_TIME)[:10]})")
    return at


def unreadable(payload: str, reason: str | None, received_at=None, source=None) -> Notification:
    """A line that is not a readable message: kept whole, quarantined for ``reason``."""
    return Notification(payload, received_at, source, None, None, None, None, None, None, reason)


def _storable(value: Any) -> bool:
    """False when a string (key or value) holds NUL or an unpaired surrogate: JSON text allows
    both through \\u escapes, but neither UTF-8 nor PostgreSQL text/jsonb can store them."""
    if isinstance(value, str):
        return UNSTORABLE_CHARS.search(value) is None
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(map(_storable, value))
    return True


def parse_line(line: str) -> Notification:
    """Classify one input line (without its line terminator)."""
    return _parse(line, envelopes=True)


def parse_message(text: str, session: str | None = None) -> Notification:
    """Classify the text of one message a live session received, by the rules of an input line
    that is a message (never an envelope): file and live input share one classification."""
    if "\x00" in text:  # raw NUL: not JSON, and not storable as PostgreSQL text (as decode_text)
        return replace(unreadable(text.replace("\x00", "\\x00"), HAS_NUL), session=session)
    return replace(_parse(text, envelopes=False), session=session)


def _parse(line: str, envelopes: bool) -> Notification:
    # An envelope's message is one level deeper in its line than on its own.
    if too_deep(line, MAX_DEPTH + envelopes):
        return unreadable(line, TOO_DEEP)
    if has_long_number(line):
        return _parse_line_exactly(line, envelopes)
    if envelopes and (exported := _exported_envelope(line)) is not None:
        return exported
    try:
        parsed = orjson.loads(line)
    except orjson.JSONDecodeError:
        return _parse_line_exactly(line, envelopes)  # the exact path words the error, or accepts what orjson refuses
    if not isinstance(parsed, dict):
        return unreadable(line, "not a JSON object")
    if "\\u" in line and not _storable(parsed):
        return unreadable(line, UNSTORABLE)
    if envelopes and "received_at" in parsed and ("message" in parsed or "line" in parsed):
        payload = _last_value_text(line, "message", parsed.get("message"))
        if payload is None:
            return _parse_line_exactly(line, envelopes)
        return _envelope(line, parsed, payload)
    return classify(line, parsed, depth_checked=not envelopes)


def _exported_envelope(line: str) -> Notification | None:
    """An envelope line as export writes it (``envelope_line``), read with one parse of its
    message's text; None for any other line (which is then read whole, as always).

    Export's form: ``{"received_at": <string>, "source": <string>[, "session": <string>],
    "message": <message>}``, with exactly these separators.  The head's strings are read as the
    exact path reads them (the standard library's strict scanstring), so once the head matches
    and the rest of the line (up to the closing brace, without whitespace around it) is one JSON
    value, the line is exactly the object of these three or four distinct keys, and that text is
    the message's: what reading the whole line would find, found with one parse instead of two.
    """
    if not line.startswith('{"received_at": "'):
        return None
    try:
        received_at, at = scan_string(line, 17)
        if not line.startswith(', "source": "', at):
            return None
        source, at = scan_string(line, at + 13)
        envelope = {"received_at": received_at, "source": source}
        if line.startswith(', "session": "', at):
            envelope["session"], at = scan_string(line, at + 14)
    except ValueError:  # a broken string
        return None
    line_end = line.rstrip(" \t\r\n")  # (the line itself, unless whitespace ends it)
    if not line.startswith(', "message": ', at) or not line_end.endswith("}"):
        return None
    payload = line_end[at + 13 : -1].strip(" \t\r\n")
    try:
        envelope["message"] = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if "\\u" in line and not _storable(envelope):
        return unreadable(line, UNSTORABLE)
    return _envelope(line, envelope, payload)


def _last_value_text(line: str, key: str, value: Any) -> str | None:
    """The raw text of ``key``'s value when it is the object's last key (as export writes it).

    The first '"key":' in the line can only be that top-level key or sit inside the text before
    it; parsing the candidate back and comparing with the value parsed from the whole line
    rules out every other case.  None when unsure: the caller then scans the line exactly.
    """
    at = line.find(f'"{key}":')
    end = line.rstrip(" \t\r\n")
    if at < 0 or not end.endswith("}"):
        return None
    candidate = line[at + len(key) + 3 : len(end) - 1].strip(" \t\r\n")
    try:
        return candidate if orjson.loads(candidate) == value else None
    except orjson.JSONDecodeError:
        return None


def _parse_line_exactly(line: str, envelopes: bool) -> Notification:
    """The general path: scan the top-level object with the standard library's decoder."""
    try:
        spans = object_spans(line)
    except ValueError as exc:
        return unreadable(line, f"not JSON: {exc}")
    if spans is None:
        return unreadable(line, "not a JSON object")
    values = {key: value for key, (value, _, _) in spans.items()}
    if ("\\u" in line or "\x00" in line) and not _storable(values):
        return unreadable(line, UNSTORABLE)
    if envelopes and "received_at" in values and ("message" in values or "line" in values):
        payload = line[spans["message"][1] : spans["message"][2]] if "message" in spans else None
        return _envelope(line, values, payload)
    return classify(line, values, depth_checked=not envelopes)


def _envelope(line: str, envelope: dict, payload: str | None) -> Notification:
    """An envelope line: ``payload`` is the raw text of its message (None for a "line" one)."""
    try:
        received_at = parse_timestamp(envelope["received_at"])
    except (ValueError, OverflowError) as exc:
        return unreadable(line, f"envelope received_at is not a timestamp: {exc}")
    source = envelope.get("source")
    if not isinstance(source, str) or not source:
        return unreadable(line, "envelope source is not a non-empty string", received_at)
    if too_long(source):
        return unreadable(line, f"envelope source is longer than {MAX_KEY_BYTES} bytes (not indexable)", received_at)
    kind, session = envelope.get("kind", NOTIFICATION), envelope.get("session")
    if kind not in KINDS:
        return unreadable(line, f"envelope kind is not one of {', '.join(KINDS)}", received_at, source)
    if session is not None and (not isinstance(session, str) or not session or too_long(session)):
        return unreadable(line, f"envelope session is not a non-empty string of at most {MAX_KEY_BYTES} bytes",
                          received_at, source)
    if kind != NOTIFICATION:
        # A session marker or snapshot (what export writes for those rows): its payload is the
        # "line" string exactly, never parsed as an input line of its own.
        if not isinstance(envelope.get("line"), str):
            return unreadable(line, f"envelope of kind {kind} has no line string", received_at, source)
        return replace(classify_record(kind, envelope["line"], session), received_at=received_at, source=source)
    if payload is not None:
        # (The line passed MAX_DEPTH + 1, so its message is within MAX_DEPTH.)
        return classify(payload, envelope["message"], received_at, source, session, depth_checked=True)
    if not isinstance(envelope["line"], str):
        return unreadable(line, "envelope line is not a string", received_at, source)
    # An exported row whose payload was a whole input line (not JSON, or a broken envelope).
    inner = parse_line(envelope["line"])
    reason = envelope.get("quarantine_reason")
    if isinstance(reason, str) and reason.startswith(RAW_REASONS) and reason != inner.quarantine_reason:
        # A reason decided on the raw bytes (not UTF-8, NUL), which the text cannot show again;
        # any other carried reason is ignored: the line is classified by what it holds.
        inner = unreadable(envelope["line"], reason)
    return replace(inner, received_at=inner.received_at or received_at, source=inner.source or source,
                   session=inner.session or session)


def reclassify(payload: str, quarantine_reason: str | None, kind: str = NOTIFICATION) -> Notification:
    """Classify a stored payload again, as it was classified when appended (for ``verify``)."""
    if (quarantine_reason or "").startswith(CLAIM_REFUSED):  # (decided on the line's claim, not its payload)
        return replace(reclassify(payload, None, kind), quarantine_reason=quarantine_reason)
    if kind != NOTIFICATION:
        return classify_record(kind, payload)
    if (quarantine_reason or "").startswith(RAW_REASONS):
        return unreadable(payload, quarantine_reason)
    if (quarantine_reason or "").startswith(LINE_REASONS):
        return parse_line(payload)
    return classify(payload, load_json(payload))


def classify_record(kind: str, payload: str, session: str | None = None) -> Notification:
    """A session marker or a snapshot (``kind``), from its payload text; quarantined when the
    payload is not what that kind must be (a snapshot row then heals nothing)."""
    try:
        if too_deep(payload, MAX_DEPTH):
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        value = load_json(payload)
    except ValueError as exc:
        return replace(unreadable(payload, f"{kind} is not JSON: {exc}"), kind=kind, session=session)
    reason: str | None
    if not _storable(value):
        reason = UNSTORABLE
    elif kind == SESSION:
        reason = None if isinstance(value, dict) and value.get("event") in SESSION_EVENTS else \
            f"session marker without an event of {', '.join(SESSION_EVENTS)}"
    elif not isinstance(value, dict) or not isinstance(value.get("workitems"), list):
        reason = "snapshot without a workitems list"
    elif value.get("statusCode", 0) != 0:
        reason = f"snapshot statusCode is {as_text(value.get('statusCode'))}"
    else:
        reason = None
    return replace(unreadable(payload, reason), kind=kind, session=session)


def snapshot_workitems(data: dict) -> dict[str, dict]:
    """The workitem resources a (valid) snapshot lists, by id as text; entries that are not
    objects with an id, or whose id is too long to index, are left out."""
    listed = {}
    for resource in data.get("workitems", []):
        if isinstance(resource, dict) and (wid := as_text(resource.get("id"))) is not None and not too_long(wid):
            listed[wid] = resource
    return listed


def decode_text(raw: bytes) -> tuple[str, str | None]:
    """Bytes as the text the log stores, and a quarantine reason when they are not storable
    text: bytes that are not UTF-8 are kept as ``\\xNN`` and NUL as the four characters
    ``\\x00`` (PostgreSQL text cannot hold NUL)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
        return text, f"{NOT_UTF8}: {exc.reason} at byte {exc.start}"
    if "\x00" in text:
        return text.replace("\x00", "\\x00"), HAS_NUL
    return text, None


def classify(payload: str, message: Any, received_at=None, source=None, session=None, *,
             depth_checked: bool = False) -> Notification:
    """Apply the quarantine rules to a parsed message (see docs/RULES.md)."""
    if not isinstance(message, dict):
        return replace(unreadable(payload, "message is not a JSON object", received_at, source), session=session)
    if not depth_checked and too_deep(payload, MAX_DEPTH):
        return replace(unreadable(payload, TOO_DEEP, received_at, source), session=session)
    channel = as_text(message.get("channel"))
    message_id = as_text(message.get("id"))
    data = message.get("data")
    if too_long(message_id):
        return _too_long(payload, "id", received_at, source, session)
    if not isinstance(data, dict):
        missing = "data is missing" if data is None else "data is not an object"
        return Notification(payload, received_at, source, channel, message_id, None, None, None, None, missing,
                            NOTIFICATION, session)
    message_type = as_text(data.get("messageType"))
    notification_type = as_text(data.get("notificationType"))
    workitem = data.get("workitem")
    workitem_id = as_text(workitem.get("id")) if isinstance(workitem, dict) else None
    reference_id = as_text(data.get("referenceId"))
    for name, key in (("workitem.id", workitem_id), ("referenceId", reference_id)):
        if too_long(key):
            return _too_long(payload, name, received_at, source, session)
    reason: str | None
    if message_type != MESSAGE_TYPE:
        reason = f"messageType is {message_type!r}, not {MESSAGE_TYPE!r}"
    elif notification_type not in NOTIFICATION_TYPES:
        reason = f"notificationType {notification_type!r} is not one of {', '.join(NOTIFICATION_TYPES)}"
    elif notification_type != ERROR and workitem_id is None:
        reason = f"{notification_type} without workitem.id"
    elif notification_type == ERROR and workitem_id is None and reference_id is None:
        reason = "Error with neither referenceId nor workitem.id"
    else:
        reason = None
    return Notification(
        payload, received_at, source, channel, message_id, message_type, notification_type,
        workitem_id, reference_id, reason, NOTIFICATION, session,
    )


def _too_long(payload: str, name: str, received_at, source, session) -> Notification:
    """A message with a key too long to index: quarantined, no column extracted."""
    reason = f"{name} is longer than {MAX_KEY_BYTES} bytes (not indexable)"
    return replace(unreadable(payload, reason, received_at, source), session=session)


def utc_text(at: dt.datetime) -> str:
    """'YYYY-MM-DDTHH:MM:SS.ffffffZ', the form of timestamps in envelopes and in the hash chain.

    (isoformat: several times faster than the equivalent strftime.)
    """
    if at.tzinfo is not dt.UTC:
        at = at.astimezone(dt.UTC)
    return at.isoformat(timespec="microseconds")[:26] + "Z"  # [:26] drops "+00:00"


def epoch_text(seconds: float) -> str:
    """``utc_text`` of a POSIX time (epoch seconds)."""
    return utc_text(dt.datetime.fromtimestamp(seconds, dt.UTC))


def envelope_line(received_at: dt.datetime, source: str, payload: str, session: str | None = None) -> str:
    """The envelope line ``export`` writes: the message's own text embedded unchanged."""
    at = f'{{"received_at": "{utc_text(received_at)}", "source": {json.dumps(source)}, '
    if session is not None:
        at += f'"session": {json.dumps(session)}, '
    return at + f'"message": {payload}}}'
