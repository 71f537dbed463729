"""Writing the log back out as envelope lines, in seq order (the format ``import`` reads)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from sqlalchemy import Connection, select

from .notifications import LINE_REASONS, NOTIFICATION, envelope_line, parse_line, utc_text
from .reading import pages
from .redaction_check import read_records
from .schema import event_log, redactions

_JSON_WS = " \t\r\n"


def export_lines(conn: Connection, after_seq: int = 0, upto_seq: int | None = None,
                 chunk: int = 5000) -> Iterator[str]:
    """Envelope lines for after_seq < seq <= upto_seq.

    A payload that is a message is embedded as it is (``"message": <payload>``); a payload that
    is a whole input line that was not one (not JSON, or a broken envelope), or a message line
    with whitespace around it, is carried as a JSON string under ``"line"`` (with its
    ``"quarantine_reason"`` when that was decided on the raw bytes), so that importing the
    export classifies every row as before.

    A redacted row (one with redactions records) also carries its original ``"payload_sha256"``
    and its ``"redactions"`` (oldest first: redacted_at, reason, keys, payload_sha256,
    redacted_by) before its message or line: importing it stores the row with them
    (``redaction_check.claimed``), so the chain and the seals' heads are the same.
    """
    c = event_log.c
    query = select(c.seq, c.received_at, c.source, c.payload, c.quarantine_reason, c.kind, c.session,
                   c.payload_sha256)
    for rows in pages(conn, query, after_seq, upto_seq, size=chunk):
        redacted = _redacted_seqs(conn, rows[0][0], rows[-1][0])
        records = read_records(conn, redacted) if redacted else {}
        for seq, received_at, source, payload, reason, kind, session, digest in rows:
            claim = {"payload_sha256": digest, "redactions": records[seq]} if seq in records else {}
            # A message line with whitespace around it is also carried whole: embedded as a
            # message, the whitespace would not be part of the payload read back.
            if kind != NOTIFICATION or (reason or "").startswith(LINE_REASONS) or payload != payload.strip(_JSON_WS):
                entry = {"received_at": utc_text(received_at), "source": source}
                if kind != NOTIFICATION:
                    entry["kind"] = kind  # a session marker or snapshot: its payload as it is
                if session is not None:
                    entry["session"] = session
                entry |= claim
                entry["line"] = payload
                if kind == NOTIFICATION and reason and parse_line(payload).quarantine_reason != reason:
                    entry["quarantine_reason"] = reason  # decided on the raw bytes (not UTF-8, NUL)
                yield json.dumps(entry)
            elif claim:
                head = {"received_at": utc_text(received_at), "source": source}
                if session is not None:
                    head["session"] = session
                yield json.dumps(head | claim)[:-1] + f', "message": {payload}}}'
            else:
                yield envelope_line(received_at, source, payload, session)


def _redacted_seqs(conn: Connection, first: int, last: int) -> list[int]:
    """The seqs from ``first`` to ``last`` that have redactions records (one range of the seq index)."""
    c = redactions.c
    return list(conn.execute(select(c.seq).where(c.seq >= first, c.seq <= last).distinct()).scalars())
