"""Offline proofs that one row is in a sealed log, unaltered (docs/RULES.md section 9.4).

A proof holds the row (payload included), the chain link before it, the chained fields of every
later row up to the next seal, and that seal.  ``check`` needs only the proof and the public
key: it recomputes the row's payload hash, then each chain_hash up to the seal's seq, and checks
that the last one is the sealed head and that the seal's signature verifies.

A redacted row's proof also holds its ``"redactions"`` records: its payload no longer hashes to
its (original) payload_sha256, and ``check`` accepts it when the redaction check holds
(``redaction_check.problem``), saying the original is not recomputable.  The records are not
under the seal: what they say of when, why and by whom is the store's word.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, select

from . import redaction_check
from .db import StoreError
from .log import GENESIS_HASH, chain_hash, payload_sha256
from .notifications import KINDS, parse_timestamp, utc_text
from .schema import event_log
from .schema import seals as seals_table
from .seals import Seal

FORMAT = "workitem-store-proof/1"
# The chained fields of a row (docs/RULES.md section 8), in this order in every link.
LINK_FIELDS = ("seq", "received_at", "source", "payload_sha256", "duplicate_of", "quarantine_reason", "kind",
               "session", "chain_hash")


class ProofError(StoreError):
    """No proof can be made (no such row, no seal after it yet)."""


def _link(row) -> list:
    return [row.seq, utc_text(row.received_at), row.source, row.payload_sha256, row.duplicate_of,
            row.quarantine_reason, row.kind, row.session, row.chain_hash]


def prove(conn: Connection, seq: int) -> dict:
    """The proof of row ``seq``, against the first seal at or after it."""
    c = event_log.c
    row = conn.execute(select(event_log).where(c.seq == seq)).first()
    if row is None:
        raise ProofError(f"the log has no row with seq {seq}")
    sealed = conn.execute(select(seals_table).where(seals_table.c.seq >= seq)
                          .order_by(seals_table.c.n).limit(1)).first()
    if sealed is None:
        raise ProofError(f"no seal covers seq {seq} yet: run `workitem-store seal` first")
    before = GENESIS_HASH if seq == 1 else conn.execute(select(c.chain_hash).where(c.seq == seq - 1)).scalar()
    later = conn.execute(select(*(c[name] for name in LINK_FIELDS))
                         .where(c.seq > seq, c.seq <= sealed.seq).order_by(c.seq)).all()
    last = later[-1].chain_hash if later else row.chain_hash
    if len(later) != sealed.seq - seq or last != sealed.chain_hash:  # a proof that could never check
        raise ProofError(f"seal {sealed.n} (seq {sealed.seq}) does not match the log: the log no longer holds "
                         f"the sealed head (run `workitem-store verify`)")
    proof = {
        "format": FORMAT,
        "prev_chain_hash": before,
        "row": {**dict(zip(LINK_FIELDS, _link(row), strict=True)), "payload": row.payload},
        "links": [_link(r) for r in later],
        "seal": Seal(**sealed._mapping).as_dict(),
    }
    if payload_sha256(row.payload) != row.payload_sha256:  # redacted: its records (the check's evidence)
        proof["redactions"] = redaction_check.read_records(conn, [seq]).get(seq, [])
    return proof


def dumps(proof: dict) -> str:
    """The one byte form of a proof: sorted keys, no spaces, ASCII only, a final newline.  The
    checker accepts only this form, so no byte of a proof can change unnoticed."""
    return json.dumps(proof, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n"


_HEX64 = re.compile(r"[0-9a-f]{64}")
_TYPES: dict[str, type | tuple[type, ...]] = {
    "seq": int, "received_at": str, "source": str, "payload_sha256": str, "duplicate_of": (int, type(None)),
    "quarantine_reason": (str, type(None)), "kind": str, "session": (str, type(None)), "chain_hash": str}


def _malformed(link: dict) -> str | None:
    """What makes a link not one the store writes (each value in exactly the form it hashes)."""
    for name, kinds in _TYPES.items():
        if type(link[name]) is bool or not isinstance(link[name], kinds):
            return f"{name} has the wrong type"
    if link["seq"] < 1:
        return "seq is not a positive integer"
    if not all(_HEX64.fullmatch(link[name]) for name in ("payload_sha256", "chain_hash")):
        return "payload_sha256 or chain_hash is not 64 lowercase hex digits"
    if link["kind"] not in KINDS:
        return f"kind is not one of {', '.join(KINDS)}"
    # The chain hashes NULL and "" alike; the store never writes "", so a proof holds only NULL.
    if link["quarantine_reason"] == "" or link["session"] == "":
        return "quarantine_reason or session is empty text (the store writes NULL)"
    if utc_text(parse_timestamp(link["received_at"])) != link["received_at"]:
        return "received_at is not in the chain's form YYYY-MM-DDTHH:MM:SS.ffffffZ"
    return None


@dataclass
class ProofResult:
    ok: bool
    message: str  # what holds, or the first thing that does not


def check(data: bytes, public_key: Ed25519PublicKey) -> ProofResult:
    """Check a proof file's bytes with the public key alone."""
    try:
        proof = json.loads(data)
    except (ValueError, RecursionError) as exc:
        return ProofResult(False, f"not a proof: not JSON ({exc})")
    try:
        if dumps(proof).encode() != data:
            return ProofResult(False, "the proof is not in its written form (a byte was changed, added or removed)")
        if not isinstance(proof, dict) or proof.get("format") != FORMAT or set(proof) - {"redactions"} != {
                "format", "prev_chain_hash", "row", "links", "seal"}:
            return ProofResult(False, f"not a {FORMAT} proof")
        sealed = Seal.from_dict(proof["seal"])
        row, links = proof["row"], proof["links"]
        if set(row) != {*LINK_FIELDS, "payload"} or not isinstance(links, list):
            return ProofResult(False, "the proof's row or links are malformed")
        if not sealed.signed_by(public_key):
            return ProofResult(False, f"seal {sealed.n}'s signature does not verify with this public key")
        problem = _malformed(dict(zip(LINK_FIELDS, [row[name] for name in LINK_FIELDS], strict=True)))
        if problem:
            return ProofResult(False, f"the proof's row is malformed: {problem}")
        if not sealed.seq >= row["seq"]:
            return ProofResult(False, f"the seal (seq {sealed.seq}) is before the row (seq {row['seq']})")
        if not isinstance(row["payload"], str):
            return ProofResult(False, f"row {row['seq']}: its payload is not a text")
        redacted = payload_sha256(row["payload"]) != row["payload_sha256"]
        if redacted != ("redactions" in proof):
            return ProofResult(False, f"row {row['seq']}: its payload does not hash to its payload_sha256" + (
                "" if redacted else " (and the proof carries redactions for it)"))
        if redacted and (why := _redaction_problem(row, proof["redactions"])):
            return ProofResult(False, f"row {row['seq']}: its payload does not hash to its payload_sha256, and is "
                                      f"no redaction that holds: {why}")
        prev = proof["prev_chain_hash"]
        if not isinstance(prev, str) or not _HEX64.fullmatch(prev) or row["seq"] == 1 and prev != GENESIS_HASH:
            return ProofResult(False, "prev_chain_hash is not 64 lowercase hex digits (sixty-four zeros for seq 1)")
        for values in [[row[name] for name in LINK_FIELDS], *links]:
            link = dict(zip(LINK_FIELDS, values, strict=True))
            problem = _malformed(link)
            if problem:
                return ProofResult(False, f"the proof's link {values!r:.80} is malformed: {problem}")
            computed = chain_hash(prev, link["seq"], parse_timestamp(link["received_at"]), link["source"],
                                  link["payload_sha256"], link["duplicate_of"], link["quarantine_reason"],
                                  link["kind"], link["session"])
            if computed != link["chain_hash"]:
                return ProofResult(False, f"the chain breaks at seq {link['seq']}: its fields hash to {computed}, "
                                          f"the proof says {link['chain_hash']}")
            prev = computed
        seqs = [row["seq"], *(values[0] for values in links)]
        if seqs != list(range(row["seq"], row["seq"] + len(seqs))) or seqs[-1] != sealed.seq:
            return ProofResult(False, f"the links do not run from seq {row['seq']} to the sealed seq {sealed.seq}")
        if prev != sealed.chain_hash:
            return ProofResult(False, f"the chain reaches {prev} at seq {sealed.seq}, "
                                      f"the seal says {sealed.chain_hash}")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        return ProofResult(False, f"the proof is malformed ({type(exc).__name__}: {exc})")
    if redacted:
        return ProofResult(True, f"row {row['seq']} is in store {sealed.store_id}'s log, under seal {sealed.n} "
                                 f"(seq {sealed.seq}, sealed {sealed.sealed_at}, key {sealed.key_id[:16]}…); payload "
                                 f"redacted (original not recomputable): {_redaction_summary(proof['redactions'])}")
    return ProofResult(True, f"row {row['seq']} is in store {sealed.store_id}'s log as written, under seal "
                             f"{sealed.n} (seq {sealed.seq}, sealed {sealed.sealed_at}, key {sealed.key_id[:16]}…)")


def _redaction_problem(row: dict, records) -> str | None:
    """Why a proof's redacted row does not hold (redaction_check; the proof holds no extracted
    columns, so its payload is checked against its chained quarantine reason and kind)."""
    return redaction_check.claim_malformed(row["payload_sha256"], records) or \
        redaction_check.problem(row["payload"], row["kind"], row["quarantine_reason"], records)


def _redaction_summary(records: list[dict]) -> str:
    """The records as the check-proof message shows them (not covered by the seal)."""
    return "; ".join(f"keys {', '.join(r['keys'])} at {r['redacted_at']} ({r['reason']})" for r in records) + \
        " (the records are not under the seal)"
