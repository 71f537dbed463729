"""Checking what an auditor relies on: the hash chain, and projections equal to a fresh rebuild."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from sqlalchemy import JSON, Connection, String, Table, func, select

from . import seals
from .db import collections_postponed, open_store, write_transaction
from .log import GENESIS_HASH, chain_hash, counts, head, payload_sha256
from .notifications import EXTRACTED, reclassify
from .projections import PROJECTIONS, runner
from .schema import event_log, imported_files, projection_checkpoints


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
    # The first row whose extracted columns (channel ... reference_id, not covered by the chain)
    # disagree with its payload: what = the column.
    column_mismatch: ChainBreak | None = None
    # table -> {"missing": rows a rebuild has that the table lacks, "unexpected": the reverse}
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
    seals: seals.SealReport | None = None
    # --since-last-seal: the chain was checked from this seal (None: from seq 1) and the
    # projections were not compared.
    since_seal: seals.Seal | None = None
    projections_compared: bool = True

    @property
    def ok(self) -> bool:
        return (self.chain_break is None and self.column_mismatch is None and not self.differences
                and not self.lagging and not self.counts_mismatch and not self.truncated
                and not (self.seals and self.seals.problems))


def verify_chain(conn: Connection, report: VerifyReport, chunk: int = 10_000, after: int = 0,
                 after_hash: str = GENESIS_HASH) -> None:
    """Recompute payload hashes and the chain from seq ``after`` + 1 (whose previous link is
    ``after_hash``); stop at the first broken link.  From seq 1, also check event_log_counts."""
    c = event_log.c
    query = (select(c.seq, c.received_at, c.source, c.payload, c.payload_sha256, c.chain_hash,
                    c.duplicate_of, c.quarantine_reason, c.kind, c.session, *(c[name] for name in EXTRACTED))
             .order_by(c.seq).limit(chunk))
    prev, expected_seq = after_hash, after + 1
    report.head_seq, report.head_hash = after, after_hash
    counted: Counter[tuple] = Counter()
    while True:
        rows = conn.execute(query.where(c.seq >= expected_seq)).all()
        if not rows:
            if after == 0:
                _check_counts(conn, report, counted)
            return
        for r in rows:
            counted[r.kind, r.quarantine_reason, r.duplicate_of is not None] += 1
            if r.seq != expected_seq:
                report.chain_break = ChainBreak(expected_seq, "seq", str(expected_seq), str(r.seq))
                return
            digest = payload_sha256(r.payload)
            if digest != r.payload_sha256:
                report.chain_break = ChainBreak(r.seq, "payload_sha256", digest, r.payload_sha256)
                return
            link = chain_hash(prev, r.seq, r.received_at, r.source, digest, r.duplicate_of, r.quarantine_reason,
                              r.kind, r.session)
            if link != r.chain_hash:
                report.chain_break = ChainBreak(r.seq, "chain_hash", link, r.chain_hash)
                return
            if report.column_mismatch is None:
                try:
                    derived = reclassify(r.payload, r.quarantine_reason, r.kind)
                except ValueError as exc:  # the row claims a message that does not read as one
                    report.column_mismatch = ChainBreak(r.seq, "payload", "a readable message",
                                                        f"not JSON: {exc}")
                    derived = None
                for name in EXTRACTED if derived is not None else ():
                    if getattr(derived, name) != getattr(r, name):
                        report.column_mismatch = ChainBreak(r.seq, name, str(getattr(derived, name)),
                                                            str(getattr(r, name)))
                        break
            prev, expected_seq = link, expected_seq + 1
            report.rows, report.head_seq, report.head_hash = report.rows + 1, r.seq, link


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


def _json_text(value) -> str:
    """A JSON value as text that compares by meaning: keys sorted, numbers by value.

    PostgreSQL's jsonb keeps a number's value, not its spelling: 1e300 written from Python comes
    back as a 301-digit integer, equal in value to the 1e300 a rebuild computes.
    """
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_json_text(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(_json_text, value)) + "]"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        return str(number.normalize()) if number else "0"
    return json.dumps(value)


def _canonical(row: Mapping, columns: list[str], json_columns: set[str]) -> tuple:
    return tuple(_json_text(row[c]) if c in json_columns and row[c] is not None else row[c] for c in columns)


def _checkpoints(conn: Connection) -> dict[str, tuple[int, int]]:
    """Each projection's checkpoint and kept row count ((0, 0) when it has none)."""
    c = projection_checkpoints.c
    stored = {name: (seq, rows) for name, seq, rows in conn.execute(select(c.projection, c.last_seq, c.rows))}
    return {cls.name: stored.get(cls.name, (0, 0)) for cls in PROJECTIONS}


def compare_projections(conn: Connection, report: VerifyReport, checkpoints: dict[str, tuple[int, int]],
                        examples: int = 3) -> None:
    """Compare every projection table with the rows a rebuild from the log gives at its
    checkpoint.

    The rebuild runs into a scratch SQLite store in a temporary directory ($TMPDIR; it needs
    about the space of the projection tables), step by step as ``rebuild`` does, so memory does
    not grow with the log; then each table and its rebuilt twin are read in primary-key order
    and compared as two sorted streams.
    """
    with tempfile.TemporaryDirectory(prefix="workitem-store-verify-") as tmp:
        scratch = open_store(f"sqlite:///{Path(tmp) / 'rebuilt.db'}")
        try:
            reached = 0
            for upto in sorted({seq for seq, _ in checkpoints.values()}):
                with write_transaction(scratch) as rebuilt:
                    runner.replay(rebuilt, reached, upto, source=conn)
                reached = upto
                with scratch.connect() as rebuilt:
                    for cls in PROJECTIONS:
                        seq, recorded = checkpoints[cls.name]
                        if seq == upto:
                            found = _compare_table(cls.table, _sorted_rows(rebuilt, cls.table),
                                                   _sorted_rows(conn, cls.table), upto, report, examples)
                            if found != recorded:
                                report.counts_mismatch.append({"table": "projection_checkpoints", "projection": cls.name,
                                                               "counted": found, "recorded": recorded})
        finally:
            scratch.dispose()


def _sorted_rows(conn: Connection, table: Table) -> Iterator[tuple[tuple, tuple]]:
    """(primary key, canonical row) of every row, in primary-key order as Python orders the
    keys (text by code point: SQLite's BINARY, PostgreSQL's "C" collation), streamed."""
    columns = [col.name for col in table.columns]
    json_columns = {col.name for col in table.columns if isinstance(col.type, JSON)}
    key = [col.name for col in table.primary_key.columns]
    order = [col.collate("C") if conn.dialect.name == "postgresql" and isinstance(col.type, String) else col
             for col in table.primary_key.columns]
    for row in conn.execution_options(yield_per=5000).execute(select(table).order_by(*order)):
        mapping = row._mapping
        yield tuple(mapping[k] for k in key), _canonical(mapping, columns, json_columns)


def _compare_table(table: Table, expected: Iterator, found: Iterator, checkpoint: int, report: VerifyReport,
                   examples: int) -> int:
    """Merge two key-ordered streams of (key, row); a key in both with different rows counts as
    one row missing and one unexpected.  Returns how many rows ``found`` had."""
    columns = [col.name for col in table.columns]
    diff = {"checkpoint": checkpoint, "missing": 0, "unexpected": 0, "missing_examples": [],
            "unexpected_examples": []}

    def note(kind: str, row: tuple) -> None:
        diff[kind] += 1
        if len(diff[f"{kind}_examples"]) < examples:
            diff[f"{kind}_examples"].append(dict(zip(columns, map(str, row), strict=True)))

    count = 0
    e, f = next(expected, None), next(found, None)
    while e is not None or f is not None:
        if f is None or (e is not None and e[0] < f[0]):
            note("missing", e[1])
            e = next(expected, None)
            continue
        count += 1
        if e is None or f[0] < e[0]:
            note("unexpected", f[1])
            f = next(found, None)
        else:
            if e[1] != f[1]:
                note("missing", e[1])
                note("unexpected", f[1])
            e, f = next(expected, None), next(found, None)
    if diff["missing"] or diff["unexpected"]:
        report.differences[table.name] = diff
    return count


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
    report.seals = seals.check(conn, witness, public_key)
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
        compare_projections(conn, report, checkpoints)  # (replayed in steps, each postponing the collector)
    return report
