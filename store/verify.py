"""Checking what an auditor relies on: the seals, the hash chain, the extracted columns, the
kept counts, and projections equal to a fresh rebuild (``verify_projections``).

No message holds the text 'None': a NULL is shown as NULL; values found in rows are returned
as they are (None for NULL) for the CLI to word.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import hashlib
import itertools
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, func, select

from . import redaction_check, seal_check
from .bulk import collections_postponed
from .log import GENESIS_HASH, chain_hash, counts, head, payload_sha256
from .notifications import EXTRACTED, NOTIFICATION, reclassify, utc_text
from .projections import PROJECTIONS
from .reading import pages
from .schema import UTCDateTime, event_log, imported_files, projection_checkpoints
from .seal_check import SealReport
from .seals import Seal
from .verify_projections import compare_projections

_AT_TYPE = UTCDateTime()  # how the store reads received_at


@dataclass
class ChainBreak:
    seq: int
    what: str  # "seq" (a gap), "payload_sha256", "chain_hash" or, for column_mismatch, the column
    expected: str
    found: str


@dataclass
class VerifyReport:
    rows: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    chain_break: ChainBreak | None = None
    # Rows whose payload was redacted (redaction_check holds: it no longer hashes to their
    # payload_sha256, which keeps the original's, so the original is not recomputable).
    redacted: int = 0
    # The first row whose extracted columns (channel ... reference_id, not covered by the chain)
    # disagree with its payload: what = the column.
    column_mismatch: ChainBreak | None = None
    # table -> {"missing": rows a rebuild has that the table lacks, "unexpected": the reverse,
    # "pairs": [{"key", "store": its row, "log": a rebuild's row}], ...}: see verify_projections
    differences: dict[str, dict] = field(default_factory=dict)
    # The projections' checkpoints when they are not at the log's head: {projection: last_seq}
    # (a store whose projections lag its log does not show what the log holds).
    lagging: dict[str, int] = field(default_factory=dict)
    log_head_seq: int = 0  # the log's last seq (head_seq is the last one verified)
    # Kept counts that disagree with what they count: event_log_counts rows against the log
    # ({"table": "event_log_counts", "kind", "quarantine_reason", "duplicate", "counted": in the
    # log, "recorded": in the table}), projection_checkpoints.rows against the projection's table
    # ({"table": "projection_checkpoints", "projection", "counted", "recorded"}).
    counts_mismatch: list[dict] = field(default_factory=list)
    # What the store remembers of rows past the log's head (a shortened log):
    # [{"table": "imported_files" | "projection_checkpoints" | "event_log_counts", "seq": the
    # last seq it records}]; seals past the head are reported by ``seals``.
    truncated: list[dict] = field(default_factory=list)
    seals: SealReport | None = None
    # --since-last-seal: the chain was checked from this seal (None: from seq 1) and the
    # projections were not compared.
    since_seal: Seal | None = None
    projections_compared: bool = True

    @property
    def ok(self) -> bool:
        return (self.chain_break is None and self.column_mismatch is None and not self.differences
                and not self.lagging and not self.counts_mismatch and not self.truncated
                and not (self.seals and self.seals.problems))


def verify_chain(conn: Connection, report: VerifyReport, chunk: int = 10_000, after: int = 0,
                 after_hash: str = GENESIS_HASH, columns: bool = True) -> None:
    """Recompute payload hashes and the chain from seq ``after`` + 1 (whose previous link is
    ``after_hash``); stop at the first broken link.  From seq 1, also check event_log_counts.
    With ``columns``, also check the extracted columns of the rows the chain covered
    (``verify_columns``).

    The log is read ``chunk`` rows at a time by seq, through the driver's own cursor (no result
    processing).  A chunk whose values all have the types and forms the store writes is checked
    in bulk (``_links_fast``); any other chunk, possible only in a database edited by hand, row
    by row as the column types read each value (``_links_exact``, the reference).  Both report
    the same first break.
    """
    if not conn.in_transaction():
        conn.begin()  # as a first execute would: the chain, the counts and the columns read one snapshot
    report.head_seq, report.head_hash = after, after_hash
    counted: Counter[tuple] | None = Counter() if after == 0 else None
    _verify_links(conn, report, chunk, counted)
    if report.chain_break is None and counted is not None:
        _check_counts(conn, report, counted)
    if columns:
        verify_columns(conn, report, after, report.head_seq, chunk)


def _verify_links(conn: Connection, report: VerifyReport, chunk: int, counted: Counter | None) -> None:
    """The chain from report.head_seq + 1 (after report.head_hash) to the log's last row,
    advancing report.rows, head_seq and head_hash; the first broken link -> report.chain_break.
    Adds the rows read to ``counted`` (unless None)."""
    query = select(*(event_log.c[name] for name in _LINK_COLUMNS))
    for rows in pages(conn, query, report.head_seq, size=chunk, raw=True):
        prev, expected = report.head_hash, report.head_seq + 1
        columns_of_rows = tuple(zip(*rows, strict=True))
        if counted is not None:
            _count(counted, columns_of_rows)
        redacted = functools.partial(_redacted, conn, rows)
        times = _plain_times(columns_of_rows, conn.dialect)
        verified = None if times is None else _links_fast(columns_of_rows, times, prev, expected, report, redacted)
        if verified is None:
            verified = _links_exact(rows, prev, expected, report, conn.dialect, redacted)
        if verified:
            report.rows, report.head_seq, report.head_hash = (report.rows + verified, rows[verified - 1][0],
                                                              rows[verified - 1][5])
        if report.chain_break is not None:
            return


def _redacted(conn: Connection, rows: list[tuple], indices: list[int]) -> set[int]:
    """Which of a chunk's ``rows`` (at ``indices``: their payload does not hash to their
    payload_sha256) are accepted redactions (``redaction_check``)."""
    held = redaction_check.holding(conn, [(rows[i][0], rows[i][3], rows[i][7], rows[i][8]) for i in indices])
    return {i for i in indices if rows[i][0] in held}


# The columns of a link, as verify_chain reads them (a row is a tuple in this order).
_LINK_COLUMNS = ("seq", "received_at", "source", "payload", "payload_sha256", "chain_hash", "duplicate_of",
                 "quarantine_reason", "kind", "session")
_HEXDIGEST = operator.methodcaller("hexdigest")
_OR_EMPTY = {None: ""}.get  # _OR_EMPTY(value, value): "" for None, else the value
# SQLite's received_at text as UTCDateTime writes it ('YYYY-MM-DD HH:MM:SS.ffffff'), digits as 0.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_SQLITE_TIME_SHAPE = b"0000-00-00 00:00:00.000000"


def _count(counted: Counter, columns: tuple) -> None:
    """Add a chunk's rows to ``counted`` by (kind, quarantine_reason, duplicate)."""
    _, _, _, _, _, _, duplicates_of, reasons, kinds, _ = columns
    rows = len(kinds)
    if kinds.count(NOTIFICATION) == rows and reasons.count(None) == rows:  # the usual chunk
        first_copies = duplicates_of.count(None)
        counted.update({k: n for k, n in (((NOTIFICATION, None, False), first_copies),
                                          ((NOTIFICATION, None, True), rows - first_copies)) if n})
    else:
        counted.update(zip(kinds, reasons, map(operator.is_not, duplicates_of, itertools.repeat(None)), strict=False))


@functools.lru_cache(maxsize=4)
def _sqlite_times_shape(rows: int) -> bytes:
    return b"\n".join([_SQLITE_TIME_SHAPE] * rows)


def _plain_times(columns: tuple, dialect) -> list[str] | None:
    """The received_at of each row as the chain hashes it ('YYYY-MM-DDTHH:MM:SS.ffffffZ', what
    ``notifications.utc_text`` makes of what UTCDateTime reads), when every row of the chunk
    holds the types the store writes (source and kind text, quarantine_reason and session text
    or NULL) and, on SQLite, received_at in the exact form UTCDateTime writes; else None."""
    _, received_at, sources, _, _, _, _, reasons, kinds, sessions = columns
    try:
        # str.join refuses any value that is not text.
        "".join(sources), "".join(kinds)
        "".join(map(_OR_EMPTY, reasons, reasons)), "".join(map(_OR_EMPTY, sessions, sessions))
        if dialect.name != "sqlite":  # PostgreSQL: timestamptz, read as datetimes
            return [utc_text(_AT_TYPE.process_result_value(at, dialect)) for at in received_at]
        joined = "\n".join(received_at)
        # Each text 'DDDD-DD-DD DD:DD:DD.DDDDDD' with D a digit, and a valid date and time (the
        # shape alone would let '2023-02-30' through, which reading it as a datetime refuses).
        if joined.encode().translate(_DIGITS_TO_ZERO) != _sqlite_times_shape(len(received_at)):
            return None
        collections.deque(map(dt.datetime.fromisoformat, received_at), maxlen=0)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None
    # fromisoformat then utc_text of such a text only puts a "T" in the space and adds a "Z".
    return (joined.replace(" ", "T").replace("\n", "Z\n") + "Z").split("\n")


def _record_fields(kind: str, session: str | None) -> str:
    """What log.chain_hash adds to a link's text for a row that is not a notification without
    a session: kind and session."""
    return "" if kind == NOTIFICATION and session is None else f"\n{kind}\n{session or ''}"


def _links_fast(columns: tuple, times: list[str], prev: str, expected: int, report: VerifyReport,
                redacted: Callable[[list[int]], set[int]]) -> int | None:
    """Check a chunk from ``expected`` on (``prev``: the link before it), given ``_plain_times``
    of it: how many leading rows hold (a break is set on ``report``, and the redacted rows among
    them are counted), or None when a payload is not text or a text does not encode (the chunk
    is then for ``_links_exact``).  ``redacted(indices)``: which of the chunk's rows whose
    payload does not hash to their payload_sha256 are accepted redactions.

    Every row is checked against the chain_hash stored in the row before it: until the first
    row that fails, that is the link recomputed from ``prev``, so the first failure, and what
    it expected, are those of a check row after row; and no row waits for the one before it,
    so each step runs over the whole chunk at once (hashing and comparing in C).
    """
    seqs, _, sources, payloads, digests_found, links_found, duplicates_of, reasons, kinds, sessions = columns
    n = len(seqs)
    # seq is an integer key, read in ascending order: the rows follow on without a gap exactly
    # when the first is the one expected and the last n - 1 further.
    good = n if seqs[0] == expected and seqs[-1] == expected + n - 1 else \
        next(i for i, seq in enumerate(seqs) if seq != expected + i)
    try:
        digests = tuple(map(_HEXDIGEST, map(hashlib.sha256, map(str.encode, payloads[:good]))))
    except (TypeError, ValueError):
        return None
    # The rows before the first whose payload does not hash to its payload_sha256 (and is no
    # accepted redaction) can be linked with the stored digests: they equal the recomputed ones,
    # or are the original's.  Only rows that differ take the redaction check.
    held: set[int] = set()
    bad = good
    if digests != digests_found[:good]:
        differing = [i for i, (digest, found) in enumerate(zip(digests, digests_found, strict=False))
                     if digest != found]
        held = redacted(differing)
        bad = next((i for i in differing if i not in held), good)
    # The text RULES.md section 8 hashes, as log.chain_hash joins it (str() and format() agree
    # on every value a driver returns), after the previous row's stored link.
    previous = itertools.chain((prev,), links_found)
    texts = [f"{before}\n{seq}\n{at}\n{source}\n{digest}\n"
             f"{'' if duplicate_of is None else duplicate_of}\n{reason or ''}"
             for before, seq, at, source, digest, duplicate_of, reason  # (zip stops at the shortest: seqs[:bad])
             in zip(previous, seqs[:bad], times, sources, digests_found, duplicates_of, reasons, strict=False)]
    if kinds.count(NOTIFICATION) != n or sessions.count(None) != n:
        texts = list(map(operator.add, texts, map(_record_fields, kinds, sessions)))
    try:
        links = tuple(map(_HEXDIGEST, map(hashlib.sha256, map(str.encode, texts))))
    except ValueError:  # an unpaired surrogate, which no driver returns
        return None
    if links != links_found[:bad]:
        i = next(i for i, (link, found) in enumerate(zip(links, links_found, strict=False)) if link != found)
        report.chain_break = ChainBreak(seqs[i], "chain_hash", links[i], links_found[i])
        report.redacted += sum(1 for h in held if h < i)
        return i
    report.redacted += sum(1 for h in held if h < bad)
    if bad < good:
        report.chain_break = ChainBreak(seqs[bad], "payload_sha256", digests[bad], digests_found[bad])
    elif good < n:
        report.chain_break = ChainBreak(expected + good, "seq", str(expected + good), str(seqs[good]))
    return bad


def _links_exact(rows: list[tuple], prev: str, expected: int, report: VerifyReport, dialect,
                 redacted: Callable[[list[int]], set[int]]) -> int:
    """``_links_fast`` row by row, on the values as the column types read them (every
    received_at of the chunk first, as SQLAlchemy reads a result): the reference."""
    times = [_AT_TYPE.process_result_value(row[1], dialect) for row in rows]
    for i, ((seq, _, source, payload, digest_found, link_found, duplicate_of, reason, kind, session), at) in \
            enumerate(zip(rows, times, strict=True)):
        if seq != expected + i:
            report.chain_break = ChainBreak(expected + i, "seq", str(expected + i), str(seq))
            return i
        digest = payload_sha256(payload)
        held = digest != digest_found and bool(redacted([i]))
        if digest != digest_found and not held:
            report.chain_break = ChainBreak(seq, "payload_sha256", digest, digest_found)
            return i
        prev = chain_hash(prev, seq, at, source, digest_found, duplicate_of, reason, kind, session)
        if prev != link_found:
            report.chain_break = ChainBreak(seq, "chain_hash", prev, link_found)
            return i
        report.redacted += held
    return len(rows)


def verify_columns(conn: Connection, report: VerifyReport, after: int, upto: int, chunk: int = 10_000) -> None:
    """The extracted columns (channel ... reference_id, which the chain does not cover) of every
    row with ``after`` < seq <= ``upto`` against what ``notifications.reclassify`` derives from
    the row's payload, and quarantine_reason never empty text: the first row that disagrees ->
    report.column_mismatch."""
    c = event_log.c
    query = select(c.seq, c.payload, c.quarantine_reason, c.kind, *(c[name] for name in EXTRACTED))
    extracted = operator.attrgetter(*EXTRACTED)
    for rows in pages(conn, query, after, upto, chunk, raw=True):
        for row in rows:
            if row[2] == "":  # the chain hashes NULL and "" alike; the store never writes ""
                report.column_mismatch = ChainBreak(row[0], "quarantine_reason", "NULL or a reason", "''")
                return
            try:
                derived = extracted(reclassify(row[1], row[2], row[3]))
            except ValueError as exc:  # the row claims a message that does not read as one
                report.column_mismatch = ChainBreak(row[0], "payload", "a readable message", f"not JSON: {exc}")
                return
            if derived != row[4:]:
                name, want, found = next(c for c in zip(EXTRACTED, derived, row[4:], strict=True) if c[1] != c[2])
                report.column_mismatch = ChainBreak(row[0], name, _shown(want), _shown(found))
                return


def _shown(value) -> str:
    """A column's value in a message: NULL for None."""
    return "NULL" if value is None else str(value)


def _check_counts(conn: Connection, report: VerifyReport, counted: Counter) -> None:
    """event_log_counts (what ``status`` shows) against the counts of the verified log."""
    recorded = {(kind, reason, duplicate): n for kind, reason, duplicate, n in counts(conn)}
    report.counts_mismatch += [
        {"table": "event_log_counts", "kind": kind, "quarantine_reason": reason, "duplicate": duplicate,
         "counted": counted.get(key, 0), "recorded": recorded.get(key, 0)}
        for key in sorted(counted.keys() | recorded.keys(), key=str)
        if counted.get(key, 0) != recorded.get(key, 0)
        for kind, reason, duplicate in [key]
    ]


def _checkpoints(conn: Connection) -> dict[str, tuple[int, int]]:
    """Each projection's checkpoint and kept row count ((0, 0) when it has none)."""
    c = projection_checkpoints.c
    stored = {name: (seq, rows) for name, seq, rows in conn.execute(select(c.projection, c.last_seq, c.rows))}
    return {cls.name: stored.get(cls.name, (0, 0)) for cls in PROJECTIONS}


def check_lag(conn: Connection, report: VerifyReport, checkpoints: dict[str, tuple[int, int]]) -> None:
    """Projections whose checkpoint is not the log's head."""
    report.log_head_seq = head(conn)[0]
    report.lagging = {name: seq for name, (seq, _) in checkpoints.items() if seq != report.log_head_seq}


def check_truncation(conn: Connection, report: VerifyReport) -> None:
    """What the store remembers of its log's length (imported files' seq ranges, projection
    checkpoints, the row counts kept with each append) against the log's head."""
    head_seq = report.log_head_seq
    remembered = {
        "imported_files": conn.execute(select(func.max(imported_files.c.last_seq))).scalar(),
        "projection_checkpoints": conn.execute(select(func.max(projection_checkpoints.c.last_seq))).scalar(),
        "event_log_counts": sum(n for *_, n in counts(conn)),
    }
    report.truncated = [{"table": table, "seq": seq} for table, seq in remembered.items()
                        if seq is not None and seq > head_seq]


def verify(conn: Connection, witness: str | Path | None = None, public_key=None,
           since_last_seal: bool = False) -> VerifyReport:
    """Check the log: its seals (table, and ``witness`` when given; signatures with
    ``public_key``), what the store remembers of its length, the chain and extracted columns
    (from seq 1, or with ``since_last_seal`` from the newest seal that holds), the kept counts
    and, unless ``since_last_seal``, every projection against a rebuild."""
    report = VerifyReport()
    report.seals = seal_check.check(conn, witness, public_key)
    checkpoints = _checkpoints(conn)
    check_lag(conn, report, checkpoints)
    check_truncation(conn, report)
    start = report.seals.last_valid if since_last_seal else None
    report.since_seal = start
    with collections_postponed():  # millions of small acyclic objects, as in rebuild
        verify_chain(conn, report, after=start.seq if start else 0,
                     after_hash=start.chain_hash if start else GENESIS_HASH)
    report.projections_compared = not since_last_seal
    if not since_last_seal:
        # (replayed in steps, each postponing the collector)
        report.differences, mismatched = compare_projections(conn, checkpoints)
        report.counts_mismatch += mismatched
    return report
