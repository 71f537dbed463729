"""What every command shares: the one error boundary, --db, option types, progress bars, -o files."""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from pathlib import Path

import click
from sqlalchemy import Engine
from tqdm import tqdm

from .. import db, output
from ..db import StoreError
from ..notifications import parse_timestamp


def error_line(exc: BaseException) -> str:
    """The message of an expected error as one line of text safe for a terminal: an OSError
    names its file and says what is wrong with it, without the errno."""
    if isinstance(exc, OSError) and not isinstance(exc, StoreError):
        text = exc.strerror or str(exc)
        if exc.filename is not None:
            text = f"{os.fsdecode(exc.filename)}: {text}"
    else:
        text = str(exc).strip() or type(exc).__name__
    return output.safe_text(text)  # (a newline shown as \n: one line whatever the message)


class StoreGroup(click.Group):
    """The command group, and the one place where errors become messages: a StoreError (the
    library's errors the user can act on) or an OSError (a file or directory the user named)
    from any command becomes one line ``Error: ...`` on standard error and exit status 1; a
    usage error stays click's (exit status 2).  Anything else is a bug: its traceback shows."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StoreError as exc:
            raise click.ClickException(error_line(exc)) from exc
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # output closed early (`| head`): click's own quiet exit
                raise
            raise click.ClickException(error_line(exc)) from exc


def db_option(command):
    """``--db`` on every command that uses a database (also accepted before the command name)."""
    @click.option("--db", "db_url", metavar="URL|PATH", default=None,
                  help="SQLAlchemy URL or SQLite file path; default $WORKITEM_STORE_URL, "
                       "else sqlite:///workitems.db.")
    @click.pass_context
    @functools.wraps(command)
    def wrapper(ctx, db_url, **kwargs):
        ctx.obj = db_url or (ctx.obj if isinstance(ctx.obj, str) else None)
        return ctx.invoke(command, **kwargs)
    return wrapper


def db_target() -> str | None:
    """--db as given to this command or before it (None: $WORKITEM_STORE_URL, else the default)."""
    target = click.get_current_context().obj
    return target if isinstance(target, str) else None


def writer_engine() -> Engine:
    """For commands that write: the store, its schema created in an empty database."""
    return db.open_store(db_target())


def reader_engine() -> Engine:
    """For commands that only read: an existing store, never created here (a SQLite file is
    opened read-only)."""
    return db.open_reader(db_target())


# -- option types: validation where the option is declared ------------------------------------

class Utf8Text(click.ParamType):
    """Text that the store can hold: an argument whose bytes are not UTF-8 (Python keeps them
    as lone surrogates) is a usage error, not a traceback from the database driver."""

    name = "text"

    def convert(self, value, param, ctx):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            self.fail(f"{output.safe_text(ascii(value))} is not UTF-8 text (the store holds only UTF-8)", param, ctx)
        return value


UTF8_TEXT = Utf8Text()


class ByteSize(click.ParamType):
    """A size in bytes: a number, optionally with K, M, G or T (powers of 1024), e.g. 500M."""

    name = "size"
    _UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        number, unit = (text[:-1], text[-1]) if text[-1:] in self._UNITS else (text, "")
        try:
            size = int(float(number) * self._UNITS[unit])
        except ValueError:
            self.fail(f"{value!r} is not a size (e.g. 1073741824, 500M, 2G)", param, ctx)
        if size <= 0:
            self.fail(f"{value!r}: a size must be positive", param, ctx)
        return size


# The forms of ISO 8601 the store prints and reads: a date, a time to the minute or finer, then
# Z, an offset, or nothing (UTC).  A space may stand for the T (as SQL and SQLite write it).
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}(:?\d{2})?)?)?")
TIMESTAMP_FORMS = ("ISO 8601, e.g. 2026-11-02T08:00:00Z (also with +00:00 or another offset, a space for "
                   "the T, or no zone: UTC)")


class Timestamp(click.ParamType):
    """An instant, as the store prints them (``2026-11-02T08:00:00.123456Z``) or close: ``Z`` or
    an offset such as ``+00:00``, ``T`` or a space, seconds and fractions optional.  Without a
    zone it is UTC, as received_at in the input.  Gives an aware UTC datetime."""

    name = "timestamp"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        text = value.strip().upper()
        if not _TIMESTAMP.fullmatch(text):
            self.fail(f"{output.safe_text(value)!r} is not a timestamp: give {TIMESTAMP_FORMS}", param, ctx)
        try:
            return parse_timestamp(text)
        except ValueError as exc:  # a day or hour that does not exist, or out of range
            self.fail(f"{output.safe_text(value)!r}: {output.safe_text(exc)}", param, ctx)


TIMESTAMP = Timestamp()


# -- progress and output files -----------------------------------------------------------------

def progress_bar(total: int | None, unit: str, desc: str):
    """A progress bar on a terminal; nothing when stderr is a file or pipe."""
    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=not sys.stderr.isatty(),
                leave=False, file=sys.stderr)


def project_progress(desc: str):
    """(a progress bar, the ``progress(seq, head)`` callback of the projection runner driving it)."""
    bar = progress_bar(None, "ev", desc)

    def update(seq: int, head: int) -> None:
        bar.total = head
        bar.n = seq
        bar.refresh()
    return bar, update


def file_size(path: str) -> int | None:
    """For a progress bar: the size of ``path``, None if unknown (the import says what is wrong)."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return None


OUTPUT_HELP = ("File to write (default: standard output).  It is written whole or not at all (a temporary "
               "file renamed over it when complete); never the store itself, nor any other SQLite database "
               "unless --force.")
FORCE_HELP = "Overwrite an existing SQLite database file given as -o (never the store itself)."


def output_file(path: str, force: bool):
    """atomic_output for -o: never over the store of this command (--db), nor unforced over any SQLite file."""
    return output.atomic_output(path, force, output.store_files(db_target()))
