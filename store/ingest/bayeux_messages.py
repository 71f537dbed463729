"""Bayeux messages as they travel: a response body split into messages, each with its exact text,
and the advice a reply carries.  Nothing here makes a request.

``split_messages`` never fails for a message: an element of the array that is not a readable
JSON object (not JSON, too deep, not an object, not UTF-8) is handed on with an empty
placeholder message and its raw text, for the store to keep (quarantined).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..notifications import decode_text

Message = tuple[dict[str, Any], str]


@dataclass(frozen=True)
class Advice:
    """Bayeux advice; ``interval`` and ``timeout`` are milliseconds."""

    reconnect: str = "retry"
    interval: int = 0
    timeout: int = 30_000

    @classmethod
    def from_message(cls, advice: Any) -> Advice | None:
        """The advice a message carries, missing fields at their defaults (as CometD's own
        clients do), or None when it carries none."""
        if not isinstance(advice, dict):
            return None
        default = cls()
        try:
            return cls(str(advice.get("reconnect", default.reconnect)),
                       int(advice.get("interval", default.interval)),
                       int(advice.get("timeout", default.timeout)))
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
            return None  # malformed advice: keep the current one



_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# The lenient splitter's steps: the next character that matters at the top level of an element
# (a string, a bracket or a comma), the next one inside it (commas do not matter there), and the
# rest of a string after its opening quote (any character after a backslash is skipped).
_TOP = re.compile(r'["\[\]{},]')
_INNER = re.compile(r'["\[\]{}]')
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def is_402(reply: dict) -> bool:
    # Servers word it differently ("402::Unknown client", "402::session_unknown"): the code decides.
    return str(reply.get("error") or "").startswith("402")


def reply_to(message: dict, received: list[Message]) -> dict | None:
    """The reply to ``message`` among ``received``: same channel, and the same id if it has one."""
    return next((m for m, _ in received if m.get("channel") == message["channel"]
                 and m.get("id", message["id"]) == message["id"]), None)


def placeholder() -> dict[str, Any]:
    """The message handed on for an element that is not a readable JSON object: no channel, so
    it is a delivery, and its raw text is what the store keeps (and quarantines)."""
    return {}


def decode_body(body: bytes) -> str:
    """A response body as text: UTF-8, as JSON is (RFC 8259).  A body that is not UTF-8 loses
    nothing: each byte that is not is kept as the four characters ``\\xNN`` (backslashreplace),
    so the text is still storable.  ``\\x`` is no JSON escape, so a message holding such a byte is
    no longer valid JSON: it is handed on with the placeholder and stored quarantined, with its
    text as received but for those bytes (its ``raw_text.encode()`` is then not its bytes).
    A NUL (never valid in JSON text) is kept as the four characters ``\x00``, as for a file line."""
    return decode_text(body)[0]


def split_messages(body: str | bytes) -> list[Message]:
    """Parse a Bayeux response body (a JSON array of messages, or a single message) into
    ``(message, raw_text)`` pairs, ``raw_text`` being the message's exact slice of the text
    (bytes are decoded by ``decode_body``).

    No message can make this fail: an element of the array that is not a readable JSON object
    (not JSON, nested deeper than the decoder goes, not an object: ``42``, ``"text"``) is handed
    on as ``(placeholder(), raw_text)``, so that the store keeps it (quarantined) and the
    session goes on.  The normal path decodes the whole body at once; only when that fails does
    an iterative splitter find each element's text (tracking strings, escapes and bracket
    depth, without recursion: any depth) and decode each alone.  There, a NUL character (never
    valid in JSON text) is kept as the four characters ``\\x00``, as PostgreSQL text cannot hold
    NUL.  ``NaN`` and ``Infinity`` are accepted as numbers here (Python's decoder): the store's
    own classification of the raw text decides about them.

    Raises ValueError when the body itself is not an array of elements (not JSON at the top, an
    array that does not end, data after it): then no element can be told apart.
    """
    text = decode_body(body) if isinstance(body, bytes) else body
    try:
        items = _split(text)
    except (ValueError, RecursionError):
        items = _split_leniently(text.replace("\x00", "\\x00"))
    if not all(isinstance(message, dict) for message, _ in items):
        items = [(message if isinstance(message, dict) else placeholder(), raw) for message, raw in items]
    return items


def _skip_whitespace(text: str, pos: int) -> int:
    """The offset of the first character at or after ``pos`` that is not JSON whitespace."""
    found = _WHITESPACE.match(text, pos)  # (matches always: it may match nothing)
    return found.end() if found is not None else pos


def _split(text: str) -> list[tuple[Any, str]]:
    """The normal path: the whole body with the C decoder."""
    def skip(pos: int) -> int:
        return _skip_whitespace(text, pos)

    items: list[tuple[Any, str]] = []
    pos = skip(0)
    if text.startswith("{", pos):  # the spec lets a server send one message bare
        message, end = _DECODER.raw_decode(text, pos)
        items.append((message, text[pos:end]))
        pos = end
    elif not text.startswith("[", pos):
        raise ValueError("the response is not a JSON array")
    elif text.startswith("]", pos := skip(pos + 1)):
        pos += 1
    else:
        while True:
            message, end = _DECODER.raw_decode(text, pos)
            items.append((message, text[pos:end]))
            pos = skip(end)
            if text.startswith(",", pos):
                pos = skip(pos + 1)
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise ValueError(f"expected ',' or ']' at offset {pos}")
    if skip(pos) != len(text):
        raise ValueError(f"unexpected data at offset {pos}")
    return items


def _element_end(text: str, pos: int) -> int:
    """The offset of the ``,`` or ``]`` that ends the array element starting at ``pos`` (outside
    strings, at depth 0), or ``len(text)`` when the text ends first.  Iterative, so any depth;
    brackets are counted, not matched ("[}" closes as well: that element then fails to decode)."""
    depth = 0
    while True:
        found = (_INNER if depth else _TOP).search(text, pos)
        if found is None:
            return len(text)
        char, pos = found.group(), found.end()
        if char == '"':
            rest = _STRING_REST.match(text, pos)
            if rest is None:
                return len(text)  # a string that does not end
            pos = rest.end()
        elif char in "[{":
            depth += 1
        elif depth:
            depth -= 1
        elif char != "}":  # "," or "]" at depth 0; a stray "}" there is part of a broken element
            return found.start()


def _decode_element(raw: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return placeholder()


def _split_leniently(text: str) -> list[tuple[Any, str]]:
    """The fallback: each element's text found without decoding, then decoded alone."""
    def skip(pos: int) -> int:
        return _skip_whitespace(text, pos)

    pos = skip(0)
    if text.startswith("{", pos):  # a bare message that does not decode: the whole text is it
        raw = text[pos:].rstrip(" \t\n\r")
        return [(_decode_element(raw), raw)]
    if not text.startswith("[", pos):
        raise ValueError("the response is not a JSON array")
    items: list[tuple[Any, str]] = []
    pos = skip(pos + 1)
    while not text.startswith("]", pos):
        end = _element_end(text, pos)
        if end == len(text):
            raise ValueError(f"the response's array does not end (element at offset {pos})")
        raw = text[pos:end].rstrip(" \t\n\r")
        if raw:  # nothing between two commas: nothing to keep
            items.append((_decode_element(raw), raw))
        pos = end if text[end] == "]" else skip(end + 1)
    if skip(pos + 1) != len(text):
        raise ValueError(f"unexpected data at offset {pos + 1}")
    return items
