"""What an import reads: a file or a stream, decompressed when it is gzip, bzip2 or xz, and
checked to be text before anything of it is stored.

Compression is told by the first bytes (the formats' magic numbers), never by the name alone: a
capture named ``.jsonl`` that is gzip is read as gzip, and a ``.gz`` that is plain text as text.
Everything downstream (lines, offsets, the sha256 of imported_files) sees the decompressed bytes.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import io
import itertools
import lzma
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from ..errors import StoreError

SNIFF_BYTES = 64 << 10  # how much of the (decompressed) start the text check reads
READ_CHUNK = 1 << 20
JSON_WHITESPACE = b" \t\r\n"

# (name, how it starts, how to open it).  bzip2: "BZh", the block size, then the magic of a
# block (pi) or of the end of an empty stream (sqrt(pi)), so that a text line "BZh9..." is text.
_FORMATS = (
    ("gzip", (b"\x1f\x8b",), lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    ("bzip2", tuple(b"BZh" + bytes([level]) + block for level in b"123456789"
                    for block in (b"1AY&SY", b"\x17rE8P\x90")), lambda f: bz2.BZ2File(f, "rb")),
    ("xz", (b"\xfd7zXZ\x00",), lambda f: lzma.LZMAFile(f, "rb")),
)
MAGIC_BYTES = 10
# What the decompressors raise for data that is not what its magic promised, or ends too early.
# (bz2 raises a bare OSError without errno: told apart from a failing disk by that.)
_CORRUPT = (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


class ImportInputError(StoreError):
    """An input that cannot be imported as it is (its message is one line)."""


class NoSuchFile(ImportInputError):
    pass


class IsDirectory(ImportInputError):
    pass


class EmptyFile(ImportInputError):
    pass


class NotText(ImportInputError):
    """Most of the first lines are not UTF-8 or hold NUL: binary data, not JSONL (``force``
    imports it anyway, every such line quarantined)."""


class CorruptInput(ImportInputError):
    """Compressed data that cannot be decompressed (damaged, or cut short)."""


class _Chunks(io.RawIOBase):
    """A readable raw stream over an iterator of byte strings."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._pending = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            self._pending = next(self._chunks, b"")
            if not self._pending:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    return iter(lambda: stream.read(READ_CHUNK), b"")


def _read_upto(stream: BinaryIO, n: int) -> bytes:
    """``n`` bytes, fewer only at the end (a raw or chained stream may return less per read)."""
    parts, size = [], 0
    while size < n:
        part = stream.read(n - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def _peek(stream: BinaryIO, n: int, seekable: bool) -> tuple[bytes, BinaryIO]:
    """The first ``n`` bytes of ``stream``, and a stream that still starts with them (the same
    one, rewound, when it can seek; else one that gives those bytes again first)."""
    if seekable:
        start = stream.tell()
        head = _read_upto(stream, n)
        stream.seek(start)
        return head, stream
    head = _read_upto(stream, n)
    return head, io.BufferedReader(_Chunks(itertools.chain([head], _chunks(stream))), READ_CHUNK)


def open_input(stream: BinaryIO | Iterable[bytes]) -> tuple[BinaryIO, str | None, bool]:
    """``stream`` decompressed when its first bytes are those of gzip, bzip2 or xz:
    (the stream to read, the compression or None, whether it can seek).  ``stream`` may also
    be any iterable of byte strings (lines or chunks), for callers in the same process."""
    if hasattr(stream, "read"):
        raw: BinaryIO = stream  # type: ignore[assignment]  # a file object, whatever its class
        seekable = bool(getattr(raw, "seekable", lambda: False)())
    else:
        raw, seekable = io.BufferedReader(_Chunks(iter(stream)), READ_CHUNK), False
    magic, raw = _peek(raw, MAGIC_BYTES, seekable)
    for compression, starts, opener in _FORMATS:
        if magic.startswith(starts):
            decompressed: BinaryIO = opener(raw)  # type: ignore[assignment]  # GzipFile & co. read bytes
            return decompressed, compression, seekable
    return raw, None, seekable


def lines_of(stream: BinaryIO, name: str, compression: str | None) -> Iterator[bytes]:
    """The lines of ``stream`` (terminators kept); a damaged compressed stream raises CorruptInput."""
    with decompressing(name, compression):
        yield from stream


@contextlib.contextmanager
def decompressing(name: str, compression: str | None) -> Iterator[None]:
    """Turns what a decompressor raises for damaged data into CorruptInput."""
    try:
        yield
    except _CORRUPT as exc:
        raise CorruptInput(_corrupt(name, compression, exc)) from exc
    except OSError as exc:
        if compression is None or exc.errno is not None:
            raise  # a failing disk or pipe, not the data
        raise CorruptInput(_corrupt(name, compression, exc)) from exc


def _corrupt(name: str, compression: str | None, exc: BaseException) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{name}: the {compression} data is damaged or cut short ({reason})"


def check_text(stream: BinaryIO, name: str, compression: str | None, seekable: bool) -> BinaryIO:
    """``stream``, still at its start, unless most lines of its first SNIFF_BYTES are not text:
    NotText when more than half of them (blank ones aside) are not UTF-8 or hold a NUL byte."""
    with decompressing(name, compression):
        head, stream = _peek(stream, SNIFF_BYTES, seekable)
    bad, counted = unreadable_lines(head, cut=len(head) == SNIFF_BYTES)
    if bad * 2 > counted:
        raise NotText(f"{name} does not look like text: {bad} of its first {counted} lines are not UTF-8 "
                      "or hold NUL bytes (to import it anyway, every such line quarantined: --force)")
    return stream


def unreadable_lines(head: bytes, cut: bool = False) -> tuple[int, int]:
    """(lines not UTF-8 or holding NUL, non-blank lines) in ``head``; ``cut``: ``head`` is the
    start of something longer, so its last line may end mid-character (that is not held
    against it) and, when other lines precede it, is not counted at all."""
    lines = head.split(b"\n")
    if cut and len(lines) > 1:
        lines.pop()
    bad = counted = 0
    for n, line in enumerate(lines, 1):
        if not line.strip(JSON_WHITESPACE):
            continue
        counted += 1
        if b"\x00" in line:
            bad += 1
            continue
        try:
            codecs.getincrementaldecoder("utf-8")().decode(line, final=not (cut and n == len(lines)))
        except UnicodeDecodeError:
            bad += 1
    return bad, counted
