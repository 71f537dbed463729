"""From a raw input line to a typed notification, and the rules that quarantine one.

Pure functions, no database.  Three line shapes are accepted (see docs/INPUT.md):

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

MESSAGE_TYPE = "WorkitemStateChangeMessage"
STATUS_CHANGE, PROPERTIES_UPDATED, ERROR = "StatusChange", "PropertiesUpdated", "Error"
NOTIFICATION_TYPES = (STATUS_CHANGE, PROPERTIES_UPDATED, ERROR)
ENVELOPE_KEYS = ("received_at", "source", "message")

_decoder = json.JSONDecoder()
_scanstring = json.decoder.scanstring
_WS = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True, slots=True)
class Notification:
    """One input line, classified.  ``quarantine_reason`` is None for a projectable message."""

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


def _object_spans(line: str) -> dict[str, tuple[Any, int, int]] | None:
    """Top-level keys of a JSON object line -> (value, start, end); None if not an object.

    Raises ValueError when the line is not JSON at all.
    """
    idx = _WS.match(line, 0).end()
    if line[idx : idx + 1] != "{":
        json.loads(line)  # not an object: still tell JSON from garbage
        return None
    spans: dict[str, tuple[Any, int, int]] = {}
    idx = _WS.match(line, idx + 1).end()
    if line[idx : idx + 1] == "}":
        end = idx + 1
    else:
        while True:
            if line[idx : idx + 1] != '"':
                raise ValueError("expected a key")
            key, idx = _scanstring(line, idx + 1)
            idx = _WS.match(line, idx).end()
            if line[idx : idx + 1] != ":":
                raise ValueError("expected ':'")
            start = _WS.match(line, idx + 1).end()
            value, idx = _decoder.raw_decode(line, start)
            spans[key] = (value, start, idx)
            idx = _WS.match(line, idx).end()
            sep = line[idx : idx + 1]
            idx = _WS.match(line, idx + 1).end()
            if sep == "}":
                end = idx
                break
            if sep != ",":
                raise ValueError("expected ',' or '}'")
    if _WS.match(line, end).end() != len(line):
        raise ValueError("extra data after the object")
    return spans


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
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.astimezone(dt.timezone.utc)


def _unreadable(payload: str, reason: str, received_at=None, source=None) -> Notification:
    return Notification(payload, received_at, source, None, None, None, None, None, None, reason)


def parse_line(line: str) -> Notification:
    """Classify one input line (without its line terminator)."""
    try:
        spans = _object_spans(line)
    except ValueError as exc:
        return _unreadable(line, f"not JSON: {exc}")
    if spans is None:
        return _unreadable(line, "not a JSON object")
    if "message" in spans and "received_at" in spans:
        try:
            received_at = parse_timestamp(spans["received_at"][0])
        except ValueError as exc:
            return _unreadable(line, f"envelope received_at is not a timestamp: {exc}")
        source = spans["source"][0] if "source" in spans else None
        if not isinstance(source, str) or not source:
            return _unreadable(line, "envelope source is not a non-empty string", received_at)
        message, start, end = spans["message"]
        return classify(line[start:end], message, received_at, source)
    if "line" in spans and "received_at" in spans and isinstance(spans["line"][0], str):
        # An exported row whose payload was a whole input line (not JSON, or a broken envelope).
        inner = parse_line(spans["line"][0])
        try:
            received_at = parse_timestamp(spans["received_at"][0])
        except ValueError as exc:
            return _unreadable(line, f"envelope received_at is not a timestamp: {exc}")
        source = spans.get("source", (None,))[0]
        return replace(inner, received_at=inner.received_at or received_at, source=inner.source or source)
    return classify(line, {key: value for key, (value, _, _) in spans.items()})


def classify(payload: str, message: Any, received_at=None, source=None) -> Notification:
    """Apply the quarantine rules to a parsed message (see docs/RULES.md)."""
    if not isinstance(message, dict):
        return _unreadable(payload, "message is not a JSON object", received_at, source)
    channel = as_text(message.get("channel"))
    message_id = as_text(message.get("id"))
    data = message.get("data")
    if not isinstance(data, dict):
        reason = "data is missing" if data is None else "data is not an object"
        return Notification(payload, received_at, source, channel, message_id, None, None, None, None, reason)
    message_type = as_text(data.get("messageType"))
    notification_type = as_text(data.get("notificationType"))
    workitem = data.get("workitem")
    workitem_id = as_text(workitem.get("id")) if isinstance(workitem, dict) else None
    reference_id = as_text(data.get("referenceId"))
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
        workitem_id, reference_id, reason,
    )


def envelope_line(received_at: dt.datetime, source: str, payload: str) -> str:
    """The envelope line ``export`` writes: the message's own text embedded unchanged."""
    stamp = received_at.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f'{{"received_at": "{stamp}", "source": {json.dumps(source)}, "message": {payload}}}'
