"""Importing JSONL files (or standard input) into the event log.

The only writer of ``imported_files``.  A file is imported in one transaction together with its
``imported_files`` record: it is in the log whole or not at all, so a failed import can simply
be run again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Engine, select

from .. import log
from ..db import StoreError, collections_postponed, write_transaction
from ..notifications import MAX_KEY_BYTES, Notification, decode_text, parse_line, too_long, unreadable
from ..schema import imported_files

BATCH_LINES = 20_000
BATCH_BYTES = 64 << 20  # a batch also ends after this many bytes (lines can be 50 MB each)
BOM = b"\xef\xbb\xbf"
JSON_WHITESPACE = b" \t\r\n"


@dataclass
class ImportResult:
    file_name: str
    sha256: str = ""
    lines: int = 0  # non-blank lines read
    blank: int = 0  # blank lines skipped
    appended: int = 0  # rows added to event_log (= lines)
    duplicates: int = 0
    quarantined: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    reasons: dict[str, int] = field(default_factory=dict)  # quarantine reason -> count


class AlreadyImported(StoreError):
    pass


def decode_line(raw: bytes) -> Notification | None:
    """One raw line (terminator included or not) -> Notification; None for a blank line.

    Blank means JSON whitespace only (space, tab, CR, LF: RFC 8259), so a line of vertical tabs
    or form feeds is a row.  A UTF-8 byte order mark starting the line is not part of it
    (RFC 8259, section 8.1: parsers may ignore one; editors on Windows write one).
    """
    if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    if not raw.strip(JSON_WHITESPACE):
        return None
    line, reason = decode_text(raw)
    if reason is not None:
        return unreadable(line, reason)
    return parse_line(line)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _refuse_if_imported(conn, sha256: str, file_name: str) -> None:
    first = conn.execute(
        select(imported_files).where(imported_files.c.sha256 == sha256).order_by(imported_files.c.id).limit(1)
    ).first()
    if first is not None:
        raise AlreadyImported(
            f"{file_name} was already imported (same sha256 {sha256[:12]}…) as {first.file_name!r} "
            f"at {first.imported_at:%Y-%m-%d %H:%M:%S} UTC, {first.rows} rows; "
            "use --again to import it once more"
        )


def _batches(stream: BinaryIO, digest) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    size = 0
    for raw in stream:
        digest.update(raw)
        batch.append(raw)
        size += len(raw)
        if len(batch) >= BATCH_LINES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def import_stream(engine: Engine, stream: BinaryIO, *, file_name: str, source: str,
                  progress: Callable[[int], None] | None = None,
                  refuse_sha256: str | None = None) -> ImportResult:
    """Append every line of ``stream`` in one transaction and record the import.

    Lines without an envelope get ``source`` and the time they were read as ``received_at``.
    ``progress`` is called with the bytes consumed by each batch.  ``refuse_sha256``: raise
    AlreadyImported if a file with that content was imported before (checked with the log's
    write lock held, so two concurrent imports of one file cannot both pass).
    """
    if too_long(source):
        raise StoreError(f"source {source[:40]!r}... is longer than {MAX_KEY_BYTES} bytes")
    result = ImportResult(file_name)
    digest = hashlib.sha256()
    context = log.AppendContext()
    with write_transaction(engine) as conn, collections_postponed():
        if refuse_sha256 is not None:
            log.lock_for_append(conn)
            _refuse_if_imported(conn, refuse_sha256, file_name)
        next_free = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
        for raw_lines in _batches(stream, digest):
            # Lines without an envelope: the time of reading, one microsecond apart (log.append),
            # never reusing an instant of the batch before.
            received_at = max(dt.datetime.now(dt.timezone.utc), next_free)
            next_free = received_at + len(raw_lines) * log.MICROSECOND
            batch = []
            for raw in raw_lines:
                n = decode_line(raw)
                if n is None:
                    result.blank += 1
                    continue
                batch.append(n)
                if n.quarantine_reason:
                    reason = n.quarantine_reason.split(":")[0]
                    result.reasons[reason] = result.reasons.get(reason, 0) + 1
            appended = log.append(conn, batch, source=source, received_at=received_at, context=context)
            result.lines += len(batch)
            result.appended += appended.appended
            result.duplicates += appended.duplicates
            result.quarantined += appended.quarantined
            result.first_seq = result.first_seq or appended.first_seq
            result.last_seq = appended.last_seq or result.last_seq
            if progress:
                progress(sum(map(len, raw_lines)))
        result.sha256 = digest.hexdigest()
        conn.execute(imported_files.insert().values(
            file_name=file_name, sha256=result.sha256, rows=result.appended,
            first_seq=result.first_seq, last_seq=result.last_seq,
            imported_at=dt.datetime.now(dt.timezone.utc),
        ))
    return result


def import_file(engine: Engine, path: Path, *, source: str | None = None, again: bool = False,
                progress: Callable[[int], None] | None = None) -> ImportResult:
    """Import one JSONL file; refuses a file already imported (same sha256) unless ``again``."""
    try:
        sha256 = file_sha256(path)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    with path.open("rb") as stream:
        return import_stream(engine, stream, file_name=path.name, source=source or f"file:{path.name}",
                             progress=progress, refuse_sha256=None if again else sha256)


def import_lines(engine: Engine, lines: Iterable[str], *, source: str, file_name: str = "lines") -> ImportResult:
    """Import text lines (a convenience for notebooks and tests)."""
    data = "".join(line if line.endswith("\n") else line + "\n" for line in lines).encode()
    return import_stream(engine, io.BytesIO(data), file_name=file_name, source=source)
