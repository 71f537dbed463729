"""Checking a log against its seals (docs/RULES.md section 9): the seals table and a witness
file against each other, the public key, and the log's chain_hash at each sealed seq.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, select

from . import log
from .reading import select_in
from .schema import event_log
from .seals import HEAD_DIFFERS, NO_SEAL, Seal, read_witness, store_id, table_seals


@dataclass
class SealProblem:
    n: int | None  # the seal (None: a problem of the witness file as a whole)
    seq: int | None  # the seq it seals
    problem: str  # one sentence a person can read

    def __str__(self) -> str:
        if self.n is None:
            return self.problem
        return f"seal {self.n}{'' if self.seq is None else f' (seq {self.seq})'}: {self.problem}"


@dataclass
class SealReport:
    seals: int = 0  # seals checked (table and witness together)
    witness_seals: int = 0
    signatures_checked: bool = False
    last_valid: Seal | None = None  # the newest seal up to which every seal holds
    problems: list[SealProblem] = field(default_factory=list)

    @property
    def first_broken(self) -> SealProblem | None:
        return self.problems[0] if self.problems else None


def check(conn: Connection, witness: str | Path | None = None, public_key: Ed25519PublicKey | None = None,
          ) -> SealReport:
    """Every seal (the store's table and, with ``witness``, the file) against each other, the
    public key and the log: the problems found, in seal order."""
    report = SealReport(signatures_checked=public_key is not None)
    ours = store_id(conn)
    by_n: dict[int, Seal] = {s.n: s for s in table_seals(conn)}
    problems: list[SealProblem] = []
    in_witness: set[int] = set()
    if witness is not None:
        listed, unreadable = read_witness(witness)
        problems += [SealProblem(None, None, p) for p in unreadable]
        report.witness_seals = len(listed)
        for s in listed:
            if s.store_id != ours:
                problems.append(SealProblem(s.n, s.seq, f"is a seal of another store ({s.store_id}, "
                                                        f"this one is {ours})"))
                continue
            if s.n in in_witness:
                problems.append(SealProblem(s.n, s.seq, "appears twice in the witness file"))
                continue
            in_witness.add(s.n)
            stored = by_n.setdefault(s.n, s)
            if stored != s:
                problems.append(SealProblem(s.n, s.seq, "the witness file and the store's seals table disagree on it"))
        for n, s in by_n.items():
            if s.witnessed and n not in in_witness:
                problems.append(SealProblem(n, s.seq, "was written to a witness file but this witness file lacks it "
                                                      "(a line was removed, or it went to another file)"))
    head_seq = log.head(conn)[0]
    stored_hashes = _chain_hashes(conn, {s.seq for s in by_n.values() if s.seq <= head_seq})
    first_bad = min((p.n for p in problems if p.n is not None), default=None)
    previous: Seal | None = None
    for n in range(1, max(by_n, default=0) + 1):
        sealed = by_n.get(n)
        found = ("is missing: seals are numbered from 1 without gaps, and no copy of it is left (table or "
                 "witness file)") if sealed is None else _problem(sealed, previous, public_key, head_seq, stored_hashes)
        if found:
            problems.append(SealProblem(n, None if sealed is None else sealed.seq, found))
            first_bad = n if first_bad is None else min(first_bad, n)
        elif first_bad is None or first_bad > n:
            report.last_valid = sealed
        previous = sealed
    report.seals = len(by_n)
    report.problems = sorted(problems, key=lambda p: (p.n is not None, p.n or 0))
    return report


def _problem(s: Seal, previous: Seal | None, public_key: Ed25519PublicKey | None, head_seq: int,
             stored_hashes: dict[int, str]) -> str | None:
    if public_key is not None and not s.signed_by(public_key):
        return ("its signature does not verify with the public key (forged, altered, or signed by another key "
                f"{s.key_id[:16]}…)")
    if s.n == 1 and s.prev != NO_SEAL or previous is not None and s.prev != previous.digest():
        return "does not link to the seal before it (prev differs): the seals were altered or one was removed"
    if previous is not None and s.seq < previous.seq:
        return f"seals seq {s.seq}, before the seal before it (seq {previous.seq})"
    if s.seq > head_seq:
        return (f"the log is TRUNCATED: the seal covers seq {s.seq} but the log ends at seq {head_seq} "
                f"(rows {head_seq + 1}-{s.seq} are gone)")
    if s.rows != s.seq:
        return f"seals {s.rows} rows up to seq {s.seq}: a log holds seq 1..N without gaps"
    stored = stored_hashes.get(s.seq, log.GENESIS_HASH)
    if stored != s.chain_hash:
        return f"{HEAD_DIFFERS}: chain_hash at seq {s.seq} is {stored}, the seal says {s.chain_hash}"
    return None


def _chain_hashes(conn: Connection, seqs: Iterable[int]) -> dict[int, str]:
    query = select(event_log.c.seq, event_log.c.chain_hash)
    return {seq: chain for seq, chain in select_in(conn, query, [event_log.c.seq], seqs)}
