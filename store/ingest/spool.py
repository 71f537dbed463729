"""The spool: where live ingest makes what it received durable while the database cannot take it.

One directory per ingest process, ``<root>/<instance>/``, held by that process with an exclusive
``flock`` on ``lock`` (the kernel releases it when the process dies, ``kill -9`` included):

- ``meta.json``: the store it belongs to and when the process started;
- ``entries.jsonl``: the entries not yet in the log, one JSON object a line, appended and
  fsync'd before anything in them is acknowledged to the server;
- ``drained``: how many bytes of ``entries.jsonl`` are in the log (written to a temporary file,
  fsync'd, renamed);
- ``sessions``: the sessions the process started, one a line (fsync'd before the session's
  "started" marker is written), so that a successor can record the ones it never ended.

A directory whose lock can be taken belongs to a process that is gone: the next ingest process
on the same store drains it first, then records its open sessions as lost (ingest/writer.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import StoreError
from ..notifications import parse_timestamp, utc_text

ENTRIES, DRAINED, SESSIONS, META, LOCK = "entries.jsonl", "drained", "sessions", "meta.json", "lock"


@dataclass
class Entry:
    """What a live session hands to the log, whole: one batch of notifications, a session
    marker or a snapshot.  ``texts`` are the payloads, exactly as received."""

    kind: str
    source: str
    session: str
    received_at: dt.datetime
    texts: list[str]
    # With keys to redact at ingest, what the spool holds instead of clear values: per text,
    # None (nothing redacted) or its redaction claim {"payload_sha256": the received text's,
    # "record": its redactions record} (the text then redacted; writer.redacted_for_spool).
    redacted: list[dict | None] | None = None

    def to_line(self) -> str:
        value: dict[str, object] = {"kind": self.kind, "source": self.source, "session": self.session,
                                    "received_at": utc_text(self.received_at), "texts": self.texts}
        if self.redacted is not None:
            value["redacted"] = self.redacted
        return json.dumps(value, ensure_ascii=False) + "\n"

    @classmethod
    def from_line(cls, line: str) -> Entry:
        value = json.loads(line)
        return cls(value["kind"], value["source"], value["session"], parse_timestamp(value["received_at"]),
                   value["texts"], value.get("redacted"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """One process's spool directory (see the module docstring), locked while this object is open."""

    def __init__(self, directory: Path, lock_fd: int):
        self.directory, self._lock_fd = directory, lock_fd
        self.meta = json.loads((directory / META).read_text(encoding="utf-8"))
        self.instance = directory.name
        self._file = open(directory / ENTRIES, "a+b")  # noqa: SIM115 - closed by close()
        self.size = self._file.seek(0, os.SEEK_END)
        text = (directory / DRAINED).read_text(encoding="ascii").strip() if (directory / DRAINED).exists() else ""
        self.drained = min(int(text or 0), self.size)
        first = next(self.read(self.drained, 1), None)
        self.oldest = first[0].received_at if first else None  # of the oldest entry not yet drained

    @classmethod
    def create(cls, root: Path, store: str, instance: str | None = None) -> Spool:
        """A new spool directory for this process under ``root``."""
        instance = instance or f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        directory = root / instance
        try:
            directory.mkdir(parents=True)
            (directory / META).write_text(json.dumps({"store": store, "pid": os.getpid(),
                                                      "started": utc_text(dt.datetime.now(dt.UTC))}),
                                          encoding="utf-8")
            fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _fsync_dir(root)
        except OSError as exc:
            raise StoreError(f"cannot create the spool directory {directory}: {exc.strerror or exc}") from exc
        return cls(directory, fd)

    @classmethod
    def abandoned(cls, root: Path, store: str) -> list[Spool]:
        """The spools under ``root`` of processes that are gone, for this store, oldest first,
        each now locked by this process."""
        found = []
        for directory in sorted(root.iterdir()) if root.is_dir() else []:
            if not (directory / LOCK).exists() or not (directory / META).exists():
                continue
            fd = os.open(directory / LOCK, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # its process is alive
                continue
            spool = cls(directory, fd)
            if spool.meta.get("store") != store:
                spool.close()  # another store's spool sharing the root: not ours to drain
                continue
            found.append(spool)
        return found

    @property
    def pending_bytes(self) -> int:
        return self.size - self.drained

    def append(self, entries: list[Entry]) -> None:
        """Append entries and make them durable (fsync) before returning."""
        data = "".join(entry.to_line() for entry in entries).encode("utf-8")
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        if self.pending_bytes == 0 and entries:
            self.oldest = entries[0].received_at
        self.size += len(data)

    def read(self, offset: int, limit: int) -> Iterator[tuple[Entry, int]]:
        """Up to ``limit`` entries from byte ``offset``, each with the offset after it."""
        with open(self.directory / ENTRIES, "rb") as f:
            f.seek(offset)
            for _ in range(limit):
                line = f.readline()
                if not line.endswith(b"\n"):
                    return  # the end, or a line cut short by a crash (never acknowledged)
                offset += len(line)
                yield Entry.from_line(line.decode("utf-8")), offset

    def mark_drained(self, offset: int) -> None:
        """Everything before ``offset`` is in the log."""
        tmp = self.directory / (DRAINED + ".tmp")
        with open(tmp, "w", encoding="ascii") as f:
            f.write(str(offset))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / DRAINED)
        self.drained = offset
        following = next(self.read(offset, 1), None)
        self.oldest = following[0].received_at if following else None
        if self.drained == self.size:  # all in the log: start the file afresh
            # "drained" goes first: a crash in between then drains the file again, and the
            # writer finds every entry already in the log.
            (self.directory / DRAINED).unlink()
            self._file.truncate(0)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.size = self.drained = 0

    def add_session(self, session: str) -> None:
        with open(self.directory / SESSIONS, "a", encoding="utf-8") as f:
            f.write(session + "\n")
            f.flush()
            os.fsync(f.fileno())

    def sessions(self) -> list[str]:
        path = self.directory / SESSIONS
        return path.read_text(encoding="utf-8").split() if path.exists() else []

    def close(self) -> None:
        self._file.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def remove(self) -> None:
        """Delete a spool whose entries are all in the log (an abandoned one, once handled; or
        this process's own at a clean end)."""
        shutil.rmtree(self.directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.directory.parent.rmdir()  # the root too, when no other spool is left in it
        self.close()
