"""Importing JSONL files (or standard input) into the event log.

The only writer of ``imported_files``.  Files and streams compressed with gzip, bzip2 or xz are
read transparently (told by their first bytes: ingest/file_input.py); a file or stream most of
whose first lines are not text is refused unless ``force`` (see ``import_stream``).

A file is imported together with its ``imported_files`` record. Up to COMMIT_LINES lines /
COMMIT_BYTES bytes that is one transaction: the file is in the log whole or not at all. A larger
file commits every COMMIT_LINES lines or COMMIT_BYTES bytes, so that the SQLite WAL (and a
PostgreSQL transaction) stays bounded; until the last step commits, its record says ``complete``
false and ``resume_offset`` (the bytes of the file in the log), and importing the same file
again resumes there (docs/RULES.md 7). Standard input cannot resume: it is always one
transaction.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Engine, select

from .. import locks, log
from ..bulk import collections_postponed
from ..db import write_transaction
from ..errors import StoreError
from ..notifications import MAX_KEY_BYTES, Notification, decode_text, parse_line, too_long, unreadable
from ..redaction_check import claimed
from ..schema import imported_files
from .file_input import EmptyFile, IsDirectory, NoSuchFile, check_text, decompressing, lines_of, open_input

BATCH_LINES = 20_000
BATCH_BYTES = 64 << 20  # a batch also ends after this many bytes (lines can be 50 MB each)
COMMIT_LINES = 200_000  # a file's import commits after this many lines (resumable record) ...
COMMIT_BYTES = 256 << 20  # ... or this many bytes
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
    resumed_at: int | None = None  # byte offset where this run resumed an incomplete import
    commits: int = 0  # transactions the import took


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
    return claimed(line, parse_line(line))  # (an exported redacted row: its claim checked)


def content_sha256(stream: BinaryIO) -> tuple[str, int]:
    """(sha256, size) of what ``stream`` reads from where it is to its end."""
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


def _earlier_import(conn, sha256: str, file_name: str, resume: bool):
    """The incomplete import of this content to resume (when ``resume``), or None; raises
    AlreadyImported when a complete import of it exists."""
    rows = conn.execute(select(imported_files).where(imported_files.c.sha256 == sha256)
                        .order_by(imported_files.c.id)).all()
    for first in rows:
        if first.complete:
            raise AlreadyImported(
                f"{file_name} was already imported (same sha256 {sha256[:12]}…) as {first.file_name!r} "
                f"at {first.imported_at:%Y-%m-%d %H:%M:%S} UTC, {first.rows} rows; "
                "use --again to import it once more")
    return rows[-1] if rows and resume else None


def _batches(lines: Iterable[bytes], digest) -> Iterator[list[bytes]]:
    """``lines`` in batches; ``digest`` (unless None) is updated with each line."""
    batch: list[bytes] = []
    size = 0
    for raw in lines:
        if digest is not None:
            digest.update(raw)
        batch.append(raw)
        size += len(raw)
        if len(batch) >= BATCH_LINES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class ConcurrentImport(StoreError):
    pass


def import_stream(engine: Engine, stream: BinaryIO | Iterable[bytes], *, file_name: str, source: str,
                  progress: Callable[[int], None] | None = None, refuse_sha256: str | None = None,
                  resumable_sha256: str | None = None, force: bool = False,
                  redact_keys: Collection[str] = ()) -> ImportResult:
    """Append every line of ``stream`` and record the import (see the module docstring).

    ``stream`` is read decompressed when it is gzip, bzip2 or xz (told by its first bytes; for
    standard input too).  Unless ``force``, it is refused (NotText, before anything is stored)
    when more than half of the lines in its first 64 KiB are not UTF-8 or hold a NUL byte.
    Lines without an envelope get ``source`` and the time they were read as ``received_at``.
    ``progress`` is called with the bytes consumed by each batch.  ``refuse_sha256``: raise
    AlreadyImported if a file with that content was imported before (checked with the log's
    write lock held, so two concurrent imports of one file cannot both pass); an incomplete
    import of it is resumed.  ``resumable_sha256``: the content's sha256, known beforehand, for
    a seekable stream: the import may then commit in steps (none given: one transaction).
    Both are of the decompressed content, as is the sha256 recorded.  ``redact_keys``: userData
    keys whose values are redacted before the rows are first written (``log.append``).
    """
    opened, compression, seekable = open_input(stream)
    if not force:
        opened = check_text(opened, file_name, compression, seekable)
    return _import(engine, opened, compression, file_name=file_name, source=source, progress=progress,
                   refuse_sha256=refuse_sha256, resumable_sha256=resumable_sha256, redact_keys=redact_keys)


def _import(engine: Engine, stream: BinaryIO, compression: str | None, *, file_name: str, source: str,
            progress: Callable[[int], None] | None, refuse_sha256: str | None,
            resumable_sha256: str | None, redact_keys: Collection[str] = ()) -> ImportResult:
    if too_long(source):
        raise StoreError(f"source {source[:40]!r}... is longer than {MAX_KEY_BYTES} bytes")
    result = ImportResult(file_name)
    digest = None if resumable_sha256 else hashlib.sha256()  # (known: not computed a second time)
    context = log.AppendContext(redact_keys=frozenset(redact_keys))
    record = None  # this import's imported_files row, once a step committed
    offset = 0  # bytes of the stream in the log
    earlier = 0  # rows of the import this one resumes
    next_free = dt.datetime.min.replace(tzinfo=dt.UTC)
    batches = None
    while True:
        # The cyclic collector is postponed per step, not for the whole import: a step's
        # statement objects hold reference cycles (and the ids of their IN lists), freed once it
        # resumes; postponed for a whole 5M-line import they added 300 MB.
        with collections_postponed(), write_transaction(engine) as conn:
            locks.lock_for_append(conn)
            if batches is None:  # the first step: refuse, or resume
                if refuse_sha256 is not None:
                    record = _earlier_import(conn, refuse_sha256, file_name, resumable_sha256 is not None)
                if record is not None:
                    offset = result.resumed_at = record.resume_offset
                    earlier = record.rows
                    with decompressing(file_name, compression):
                        stream.seek(offset)  # compressed: decompressed again up to there
                batches = _batches(lines_of(stream, file_name, compression), digest)
            elif record is None:
                raise AssertionError("a later step without the record of the first")
            elif conn.execute(select(imported_files.c.resume_offset)
                              .where(imported_files.c.id == record.id)).scalar_one() != offset:
                raise ConcurrentImport(f"{file_name} is being imported by another process as well: this one "
                                       f"stopped after {result.commits} committed step(s) and leaves it to "
                                       "the other (if that one stops too, import the file again to resume)")
            lines = size = 0
            finished = True
            for raw_lines in batches:
                # Lines without an envelope: the time of reading, one microsecond apart
                # (log.append), never reusing an instant of the batch before.
                received_at = max(dt.datetime.now(dt.UTC), next_free)
                next_free = received_at + len(raw_lines) * log.MICROSECOND
                _append(conn, raw_lines, source, received_at, context, result)
                consumed = sum(map(len, raw_lines))
                offset, lines, size = offset + consumed, lines + len(raw_lines), size + consumed
                if progress:
                    progress(consumed)
                if resumable_sha256 is not None and (lines >= COMMIT_LINES or size >= COMMIT_BYTES):
                    finished = False
                    break
            result.sha256 = digest.hexdigest() if digest is not None else str(resumable_sha256)
            record = _record(conn, record, result, earlier, offset, finished)
            result.commits += 1
        if finished:
            return result


def _append(conn, raw_lines: list[bytes], source: str, received_at: dt.datetime, context: log.AppendContext,
            result: ImportResult) -> None:
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


def _record(conn, record, result: ImportResult, earlier: int, offset: int, complete: bool):
    """Write this import's imported_files row, with the rows and seqs of all its steps (and the
    ``earlier`` rows of the run it resumes); return it as stored."""
    c = imported_files.c
    values = {"file_name": result.file_name, "sha256": result.sha256, "complete": complete,
              "resume_offset": None if complete else offset, "imported_at": dt.datetime.now(dt.UTC),
              "rows": earlier + result.appended}
    if record is None:
        values |= {"first_seq": result.first_seq, "last_seq": result.last_seq}
        record_id = conn.execute(imported_files.insert().values(**values)).inserted_primary_key[0]
    else:
        values |= {"first_seq": record.first_seq or result.first_seq, "last_seq": result.last_seq or record.last_seq}
        record_id = record.id
        conn.execute(imported_files.update().where(c.id == record_id).values(**values))
    return conn.execute(select(imported_files).where(c.id == record_id)).one()


def import_file(engine: Engine, path: str | Path, *, source: str | None = None, again: bool = False,
                progress: Callable[[int], None] | None = None, force: bool = False,
                redact_keys: Collection[str] = ()) -> ImportResult:
    """Import one JSONL file, plain or compressed (gzip, bzip2, xz: told by its first bytes).
    ``redact_keys``: as ``import_stream``.

    Refused, each with its own StoreError: a missing file (NoSuchFile), a directory
    (IsDirectory), an empty one (EmptyFile: nothing to import, whatever was imported before),
    one that is not text (NotText, unless ``force``: see ``import_stream``), one whose content
    was imported before (AlreadyImported, unless ``again``).

    The sha256 recorded and compared is that of the decompressed content (what ``zcat FILE |
    sha256sum`` prints): the same capture imported plain and compressed is the same content.
    ``resume_offset`` counts decompressed bytes too; resuming a compressed file decompresses it
    again from its beginning up to that offset (gzip, bzip2 and xz cannot seek), appending
    nothing twice.  ``progress`` is told the bytes of the file itself (compressed) consumed.
    """
    path = Path(path)
    if path.is_dir():
        raise IsDirectory(f"{path} is a directory")
    if not path.exists():
        raise NoSuchFile(f"{path}: no such file")
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    with raw:
        try:
            stream, compression, _ = open_input(raw)
            if not force:
                stream = check_text(stream, str(path), compression, True)
            with decompressing(str(path), compression):
                sha256, size = content_sha256(stream)
                stream.seek(0)
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if size == 0:
            raise EmptyFile(f"{path} is empty: nothing to import")
        if compression is not None and progress is not None:
            progress = _raw_progress(raw, progress)
        return _import(engine, stream, compression, file_name=path.name, source=source or f"file:{path.name}",
                       progress=progress, refuse_sha256=None if again else sha256, resumable_sha256=sha256,
                       redact_keys=redact_keys)


def _raw_progress(raw: BinaryIO, progress: Callable[[int], None]) -> Callable[[int], None]:
    """``progress`` told the compressed bytes read so far instead of the decompressed ones."""
    told = 0

    def report(_decompressed: int) -> None:
        nonlocal told
        now = raw.tell()
        progress(now - told)
        told = now
    return report


def import_lines(engine: Engine, lines: Iterable[str], *, source: str, file_name: str = "lines") -> ImportResult:
    """Import text lines (a convenience for notebooks and tests)."""
    data = "".join(line if line.endswith("\n") else line + "\n" for line in lines).encode()
    return import_stream(engine, io.BytesIO(data), file_name=file_name, source=source)
