"""Trusting the store: verify, and the seals and proofs that let others check it (keygen, seal,
prove, check-proof)."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .. import db, proofs, seals
from .. import verify as verify_mod
from ..notifications import utc_text
from ..seal_check import SealReport
from .common import FORCE_HELP, OUTPUT_HELP, db_option, output_file, reader_engine, writer_engine
from .formatting import NULL, echo_json, say, seal_line


@click.command()
@click.option("--witness", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Also check the seals of this witness file: every one signed, linked, in the store's seals "
                   "table alike, and holding in the log; every seal the store wrote to a witness is in it.")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False), metavar="KEYFILE.pub",
              help="Check each seal's signature with this public key (`keygen` wrote it).")
@click.option("--since-last-seal", is_flag=True,
              help="Check the chain only from the newest seal that holds to the head (and the seals); the "
                   "projections are not compared.  Fast enough to run daily; the default checks everything.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@db_option
def verify(witness, public_key, since_last_seal, as_json):
    """Check the seals, the hash chain and every projection against a fresh rebuild.

    Exits 1 on any of: a seal that no longer holds (its signature, its link to the seal before,
    the log's chain_hash at its seq, or a log shorter than it: TRUNCATED), a log shorter than
    what the store remembers (imported files' seq ranges, projection checkpoints, kept row
    counts), a broken chain link (first one: seq, expected, found), a row whose extracted
    columns (channel, message_id, ..., reference_id) disagree with its payload, a projection row
    that a rebuild from the log would not produce, projections that lag the log (their checkpoint
    is not the head: run `project` first), or row counts kept for `status` (event_log_counts,
    projection_checkpoints.rows) that disagree with the tables.

    A projection that differs is shown row by row as "store has: ... / log says: ...": the row
    in the store's table, and the row a rebuild from the log gives (only the columns that
    differ when both exist).

    A row whose payload `forget` redacted (or that was redacted at ingest) no longer hashes to
    its payload_sha256; it passes when its newest redactions record has the payload's SHA-256
    and only recorded userData values hold the marker (docs/RULES.md 11.3), and is counted as
    "N rows redacted (original not recomputable)".  Any other change is tampering.

    \b
    Example:
      workitem-store verify
      workitem-store verify --witness /mnt/worm/seals.jsonl --public-key seal.key.pub
      workitem-store verify --since-last-seal --witness /mnt/worm/seals.jsonl --public-key seal.key.pub
    """
    key = seals.load_public_key(public_key) if public_key else None
    with db.snapshot(reader_engine()) as conn:
        report = verify_mod.verify(conn, witness, key, since_last_seal)
    if as_json:
        echo_json(_verify_json(report))
    else:
        for line in _verify_lines(report):
            say(line)
    sys.exit(0 if report.ok else 1)


def _verify_json(report: verify_mod.VerifyReport) -> dict:
    sealed = report.seals
    return {"ok": report.ok, "rows": report.rows, "head_seq": report.head_seq, "chain_head": report.head_hash,
            "chain_break": vars(report.chain_break) if report.chain_break else None,
            "column_mismatch": vars(report.column_mismatch) if report.column_mismatch else None,
            "differences": report.differences, "lagging": report.lagging,
            "counts_mismatch": report.counts_mismatch, "truncated": report.truncated, "redacted": report.redacted,
            "seals": None if sealed is None else {
                "checked": sealed.seals, "in_witness": sealed.witness_seals,
                "signatures_checked": sealed.signatures_checked,
                "last_valid": sealed.last_valid.as_dict() if sealed.last_valid else None,
                "problems": [vars(p) for p in sealed.problems]},
            "since_seal": report.since_seal.n if report.since_seal else None}


def _verify_lines(report: verify_mod.VerifyReport) -> Iterator[str]:
    sealed = report.seals
    if sealed is not None and (sealed.seals or sealed.problems):  # (a witness file of no use is a problem)
        signed = "signatures checked" if sealed.signatures_checked else "signatures NOT checked (no --public-key)"
        if sealed.problems:
            first = sealed.first_broken
            holds = (f"; the last seal that holds is {sealed.last_valid.n} (seq {sealed.last_valid.seq})"
                     if sealed.last_valid else "")
            yield f"seals BROKEN: {first}{holds}{_first_difference(report, sealed)}"
            for problem in sealed.problems[1:]:
                yield f"  also: {problem}"
        elif sealed.last_valid is not None:
            last = sealed.last_valid
            yield f"seals ok: {sealed.seals} seals, {signed}, newest {last.n} at seq {last.seq} sealed {last.sealed_at}"
    elif sealed is not None:
        yield "no seals: nothing outside this database vouches for the log (see `workitem-store seal`)"
    for t in report.truncated:
        yield f"log TRUNCATED: it ends at seq {report.log_head_seq} but {t['table']} records rows up to seq {t['seq']}"
    brk = report.chain_break
    since = f" from seal {report.since_seal.n} (seq {report.since_seal.seq})" if report.since_seal else ""
    if brk:
        yield f"chain BROKEN at seq {brk.seq}: {brk.what} expected {_value(brk.expected)}, found {_value(brk.found)}"
    else:
        yield f"chain ok{since}: {report.rows} rows, head seq {report.head_seq} {report.head_hash}"
    if report.redacted:
        yield f"{report.redacted} rows redacted (original not recomputable): only recorded userData values changed"
    bad = report.column_mismatch
    if bad:
        yield (f"event_log column {bad.what} at seq {bad.seq} DISAGREES with the payload: "
               f"expected {_value(bad.expected)}, found {_value(bad.found)}")
    for table, diff in report.differences.items():
        yield from _difference_lines(table, diff)
    for c in report.counts_mismatch:
        counted = (f"for kind {c['kind']}, quarantine reason {_value(c['quarantine_reason'], quote=True)}, "
                   f"duplicate {c['duplicate']}: the log holds" if c["table"] == "event_log_counts" else
                   f"for {c['projection']}: its table holds")
        yield f"{c['table']} DISAGREES {counted} {c['counted']} rows, {c['table']} says {c['recorded']}"
    for name, seq in report.lagging.items():
        yield (f"{name} LAGS the log: checkpoint seq {seq}, log head seq {report.log_head_seq} "
               "(run `workitem-store project`)")
    if not report.projections_compared:
        yield "projections not compared (--since-last-seal)"
    elif not report.differences:
        yield "projections ok: equal to a rebuild from the log" + (" at their checkpoints" if report.lagging else "")


def _value(value: Any, quote: bool = False) -> str:
    """A stored value in a message: NULL for NULL (never 'None'), an instant in the one form."""
    if value is None:
        return NULL
    if isinstance(value, dt.datetime):
        return utc_text(value)
    return repr(value) if quote and isinstance(value, str) else str(value)


def _row(row: dict, columns: list[str] | None = None) -> str:
    return ", ".join(f"{c}={_value(row.get(c))}" for c in (columns if columns is not None else row))


def _difference_lines(table: str, diff: dict) -> Iterator[str]:
    """A projection that differs from a rebuild: "store has" is the table's row, "log says" the
    row a rebuild from the log gives, key by key; a changed row shows the columns that differ."""
    yield (f"{table} DIFFERS from a rebuild from the log at seq {diff['checkpoint']}: the store has "
           f"{diff['unexpected']} row(s) the log does not give, and lacks {diff['missing']} row(s) it gives")
    for pair in diff["pairs"]:
        store, log = pair["store"], pair["log"]
        changed = [c for c in store if store[c] != log.get(c)] or list(store) if store and log else None
        yield (f"  {_row(pair['key'])}: store has: {_row(store, changed) if store else 'no such row'} / "
               f"log says: {_row(log, changed) if log else 'no such row'}")
    if len(diff["pairs"]) < max(diff["missing"], diff["unexpected"]):
        yield "  (the first differing keys only)"


def _first_difference(report: verify_mod.VerifyReport, sealed: SealReport) -> str:
    """Where the first changed row is, as far as the chain and the seals tell (nothing when no
    row is known to differ: a seal altered or missing, or only removed rows)."""
    if report.chain_break is not None:
        return f"; the first row that differs is seq {report.chain_break.seq}"
    moved = next((p for p in sealed.problems
                  if p.n is not None and p.seq is not None and p.problem.startswith(seals.HEAD_DIFFERS)), None)
    if moved is None or moved.seq is None:
        return ""
    after = sealed.last_valid.seq if sealed.last_valid else 0
    if after < moved.seq <= report.log_head_seq:
        return (f"; the first row that differs is between seq {after + 1} and {moved.seq} "
                "(the chain was recomputed over it)")
    return ""


@click.command()
@click.argument("keyfile", type=click.Path(dir_okay=False))
def keygen(keyfile):
    """Make an Ed25519 key pair for seals: the private key to KEYFILE (mode 0600), the public key to
    KEYFILE.pub.  Neither is ever overwritten.

    Keep KEYFILE where only the sealing process reads it; give KEYFILE.pub to auditors.

    \b
    Example:
      workitem-store keygen /etc/workitem-store/seal.key
    """
    private_path, public_path = seals.keygen(keyfile)
    key_id = seals.key_id(seals.load_public_key(public_path))
    for line in (f"private key: {private_path} (mode 0600)", f"public key:  {public_path}", f"key id:      {key_id}"):
        say(line)


@click.command()
@click.option("--key", "key_path", type=click.Path(dir_okay=False), metavar="KEYFILE", envvar=seals.KEY_ENV,
              required=True, help=f"The private key (`keygen`); default ${seals.KEY_ENV}.")
@click.option("--witness", type=click.Path(dir_okay=False), metavar="FILE", envvar=seals.WITNESS_ENV,
              help="Also append the seal to this file (JSON Lines, append-only, fsync'd): keep it outside the "
                   f"database, on WORM storage or in a SIEM; default ${seals.WITNESS_ENV}.")
@click.option("--json", "as_json", is_flag=True, help="Print the seal as JSON.")
@db_option
def seal(key_path, witness, as_json):
    """Sign the log's head (seq, chain_hash, row count, time, store id) and record the seal in the
    store's seals table and, with --witness, in a witness file.

    Anyone with the public key can then check that the log still holds what was sealed
    (`verify --witness FILE --public-key KEYFILE.pub`), or that one row is in it (`prove`,
    `check-proof`).

    \b
    Example:
      workitem-store seal --key /etc/workitem-store/seal.key --witness /mnt/worm/seals.jsonl
    """
    key = seals.load_private_key(key_path)  # (before the store is opened, or created)
    made = seals.seal(writer_engine(), key, witness)
    if as_json:
        echo_json(made.as_dict())
    else:
        click.echo(seal_line(made))


@click.command()
@click.argument("seq", type=click.IntRange(min=1))
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), default="-", help=OUTPUT_HELP)
@click.option("--force", is_flag=True, help=FORCE_HELP)
@db_option
def prove(seq, output_path, force):
    """Write a proof that the log row SEQ is in the log unaltered, checkable without the database:
    the row (payload included), the chain links from it to the next seal, and that seal.

    Its size grows with the rows between SEQ and the next seal (about 300 bytes a row).

    \b
    Example:
      workitem-store prove 1234 -o proof.json
      workitem-store check-proof proof.json --public-key seal.key.pub
    """
    with db.snapshot(reader_engine()) as conn:
        proof = proofs.prove(conn, seq)
    with output_file(output_path, force) as out:
        out.write(proofs.dumps(proof))


@click.command("check-proof")
@click.argument("proof_file", type=click.Path(exists=True, dir_okay=False), metavar="PROOF.json")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False), metavar="KEYFILE.pub", required=True,
              help="The public key of the store's seals.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check_proof(proof_file, public_key, as_json):
    """Check a proof written by `prove`, with the public key alone (no database): the row's
    payload hash, every chain link up to the seal, and the seal's signature.  Exits 1 if any
    byte of the proof was changed.

    \b
    Example:
      workitem-store check-proof proof.json --public-key seal.key.pub
    """
    result = proofs.check(Path(proof_file).read_bytes(), seals.load_public_key(public_key))
    if as_json:
        echo_json(vars(result))
    else:
        say(("proof ok: " if result.ok else "proof FAILS: ") + result.message)
    sys.exit(0 if result.ok else 1)
