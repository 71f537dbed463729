"""Writing the log back out as envelope lines, in seq order (the format ``import`` reads)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from sqlalchemy import Connection, select

from .notifications import LINE_REASONS, NOTIFICATION, envelope_line, parse_line, utc_text
from .reading import pages
from .schema import event_log

_JSON_WS = " \t\r\n"


def export_lines(conn: Connection, after_seq: int = 0, upto_seq: int | None = None,
                 chunk: int = 5000) -> Iterator[str]:
    """Envelope lines for after_seq < seq <= upto_seq.

    A payload that is a message is embedded as it is (``"message": <payload>``); a payload that
    is a whole input line that was not one (not JSON, or a broken envelope), or a message line
    with whitespace around it, is carried as a JSON string under ``"line"`` (with its
    ``"quarantine_reason"`` when that was decided on the raw bytes), so that importing the
    export classifies every row as before.
    """
    c = event_log.c
    query = select(c.seq, c.received_at, c.source, c.payload, c.quarantine_reason, c.kind, c.session)
    for rows in pages(conn, query, after_seq, upto_seq, size=chunk):
        for _seq, received_at, source, payload, reason, kind, session in rows:
            # A message line with whitespace around it is also carried whole: embedded as a
            # message, the whitespace would not be part of the payload read back.
            if kind != NOTIFICATION or (reason or "").startswith(LINE_REASONS) or payload != payload.strip(_JSON_WS):
                entry = {"received_at": utc_text(received_at), "source": source}
                if kind != NOTIFICATION:
                    entry["kind"] = kind  # a session marker or snapshot: its payload as it is
                if session is not None:
                    entry["session"] = session
                entry["line"] = payload
                if kind == NOTIFICATION and reason and parse_line(payload).quarantine_reason != reason:
                    entry["quarantine_reason"] = reason  # decided on the raw bytes (not UTF-8, NUL)
                yield json.dumps(entry)
            else:
                yield envelope_line(received_at, source, payload, session)
