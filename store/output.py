"""Safe output: files written whole or not at all (never over the store), CSV cells that a
spreadsheet will not run, and text with no control characters for the terminal."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

import click
from sqlalchemy.engine import make_url

from .db import StoreError, resolve_url

SQLITE_HEADER = b"SQLite format 3\x00"
# The files of a SQLite store besides the database itself.
_SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def is_sqlite_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file that starts with the SQLite header."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def store_files(db: str | None) -> list[Path]:
    """The files of the store ``db`` (--db as the CLI takes it): none for a server database."""
    url = make_url(resolve_url(db))
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return []
    database = Path(url.database).expanduser()
    return [database] + [database.with_name(database.name + suffix) for suffix in _SQLITE_COMPANIONS]


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_output(path: str, store: list[Path], force: bool) -> None:
    """Refuse an output path that is one of the ``store`` files (always) or any existing SQLite
    database (unless ``force``).  Raises StoreError."""
    target = Path(path).expanduser()
    for f in store:
        if _same_file(target, f):
            raise StoreError(f"refusing to write to {path}: it is the store's own file {f} (even with --force)")
    if not force and is_sqlite_file(target):
        raise StoreError(f"refusing to overwrite {path}: it is a SQLite database (give --force to overwrite it)")


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_output(path: str, force: bool = False, store: Sequence[Path] = ()):
    """A text file to write to ``path`` ("-": standard output), checked with check_output.

    A regular file is written to a temporary file in the same directory, fsync'd, and renamed
    over ``path`` only when the block completes: if it fails, ``path`` is as it was and the
    temporary file is removed.  Something that is not a regular file (/dev/null, a pipe) is
    written directly.
    """
    if path == "-":
        with click.open_file("-", "w", encoding="utf-8") as out:
            yield out
        return
    check_output(path, list(store), force)
    target = os.path.realpath(Path(path).expanduser())  # through a symlink, as open() writes
    try:
        existing = os.stat(target)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror}") from exc
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        try:
            out = open(target, "w", encoding="utf-8")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror}") from exc
        with out:
            yield out
        return
    directory, name = os.path.split(target)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        os.chmod(tmp, stat.S_IMODE(existing.st_mode) if existing else _default_mode())
        with open(fd, "w", encoding="utf-8") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself durable too
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# -- CSV ------------------------------------------------------------------------------------

# OWASP "CSV injection": a cell starting with one of these may be run as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """A string cell that a spreadsheet could take for a formula, prefixed with ' (other values
    as they are)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


# -- text for the terminal -----------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match) -> str:
    ch = match.group()
    return _NAMED.get(ch) or f"\\x{ord(ch):02x}"


def safe_text(value) -> str:
    """``value`` as text with every control character (C0 including tab and newline, DEL, C1)
    shown escaped, e.g. ESC as \\x1b: nothing stored reaches the terminal as a control code."""
    return _CONTROL.sub(_escape, value if isinstance(value, str) else str(value))


def safe_cell(value):
    """A table cell: strings escaped as safe_text, other values (numbers, None) as they are."""
    return safe_text(value) if isinstance(value, str) else value
