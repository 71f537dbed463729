"""The store's errors, and the one place driver errors become them.

    StoreError            an error the user can act on: the CLI prints its message as one line,
    │                     without a traceback ("Error: ...", exit status 1)
    ├── StoreLocked       another writer held the store's write lock longer than the wait allowed
    ├── seals.SealError   a key or witness file that cannot be used; a seal that cannot be made
    │   └── proofs.ProofError
    └── (others beside the code that raises them, e.g. in ingest)

Every message is one line and holds no password: driver errors may quote a URL or a libpq
conninfo, so ``hide_password`` runs over each message made from one.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError


class StoreError(Exception):
    """An error the user can act on; the CLI prints its message without a traceback."""


class StoreLocked(StoreError):
    """Another writer held the write lock for longer than this writer would wait (locks.py)."""


# user:password@ in a URL (up to the last @ of the word: a password may hold an @), and a
# libpq conninfo's password=... (quoted or not), as driver errors may quote them.
_URL_PASSWORD = re.compile(r"(://[^\s:/@]*):\S*@")
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def hide_password(message: str) -> str:
    """``message`` with every password in it (of a URL or a conninfo) replaced by ***."""
    return _CONNINFO_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", message))


def safe_url(url: str | URL) -> str:
    """A database URL for messages: its password shown as ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return hide_password(str(url))


def driver_message(exc: BaseException) -> str:
    """The first line of a driver error, without any password it may quote."""
    lines = str(exc).strip().splitlines()
    return hide_password(lines[0] if lines else type(exc).__name__)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Driver errors become StoreError with the driver's own first line."""
    try:
        yield
    except DBAPIError as exc:
        raise StoreError(f"database error: {driver_message(exc.orig or exc)}") from exc
