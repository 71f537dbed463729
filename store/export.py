"""Writing the log back out as envelope lines, in seq order (the format ``import`` reads)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from sqlalchemy import Connection, select

from .schema import event_log
from .notifications import envelope_line

# Quarantine reasons whose payload is the whole input line rather than a message.
LINE_REASONS = ("not JSON", "not UTF-8", "envelope")


def export_lines(conn: Connection, after_seq: int = 0, upto_seq: int | None = None,
                 chunk: int = 5000) -> Iterator[str]:
    """Envelope lines for after_seq < seq <= upto_seq.

    A payload that is a message is embedded as it is (``"message": <payload>``); a payload that
    is a whole input line that was not one (not JSON, or a broken envelope) is carried as a JSON
    string under ``"line"``, so that importing the export classifies every row as before.
    """
    c = event_log.c
    query = select(c.seq, c.received_at, c.source, c.payload, c.quarantine_reason).order_by(c.seq).limit(chunk)
    if upto_seq is not None:
        query = query.where(c.seq <= upto_seq)
    while True:
        rows = conn.execute(query.where(c.seq > after_seq)).all()
        if not rows:
            return
        for seq, received_at, source, payload, reason in rows:
            if (reason or "").startswith(LINE_REASONS):
                stamp = received_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                yield json.dumps({"received_at": stamp, "source": source, "line": payload})
            else:
                yield envelope_line(received_at, source, payload)
        after_seq = rows[-1][0]
