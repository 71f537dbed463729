"""Seals: tamper evidence that does not trust the database (store/seals.py, `keygen`, `seal`,
`verify --witness --public-key`, `verify --since-last-seal`), on SQLite and PostgreSQL.

Every attack is done as an attacker with the database's files (SQLite) or its superuser
(PostgreSQL) would: the append-only triggers out of the way, every later chain_hash recomputed
with store/log.py's chain_hash exactly as docs/RULES.md section 8 says (so the chain alone still
holds), event_log_counts and imported_files adjusted, projections rebuilt.  Only what lies
outside the attacker's reach (the private key, the witness file) can then tell.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import json
import shutil
import sqlite3
import stat
import tempfile
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import bare, data, feed, fresh_store, fresh_url, new_database, on_both_engines, run
from hypothesis import strategies as st
from sqlalchemy import create_engine, delete, func, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from test_properties import stream

from store import log, seal_check, seals
from store.db import open_store
from store.ingest import files
from store.log import GENESIS_HASH, chain_hash, payload_sha256
from store.projections import runner
from store.schema import event_log, event_log_counts, imported_files, store_identity
from store.schema import seals as seals_table
from store.simulate import simulate

# -- an attacker's tools ---------------------------------------------------------------------------

@contextlib.contextmanager
def behind_the_back(url: str, *tables: str):
    """A transaction on the store with the append-only triggers of ``tables`` out of the way
    (SQLite: dropped, then created again; PostgreSQL: disabled by the superuser, then enabled)."""
    tables = tables or ("event_log",)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                names = ", ".join(f"'{t}'" for t in tables)
                saved = conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                                          f"AND tbl_name IN ({names})")).all()
                assert saved, "the store has append-only triggers to drop"
                for name, _ in saved:
                    conn.execute(text(f"DROP TRIGGER {name}"))
                yield conn
                for _, sql in saved:
                    conn.execute(text(sql))
            else:
                for table in tables:
                    conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
                yield conn
                for table in tables:
                    conn.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))
    finally:
        engine.dispose()


def log_of(conn) -> list[dict]:
    return [dict(r._mapping) for r in conn.execute(select(event_log).order_by(event_log.c.seq))]


def rewrite_log(conn, rows: list[dict], renumber: bool = False) -> None:
    """Replace the log by ``rows``, every payload_sha256 and chain_hash recomputed from seq 1 as
    docs/RULES.md section 8 says (``renumber``: seq 1, 2, ... again, duplicate_of following), and
    cover the tracks: event_log_counts recounted, imported_files no longer past the head."""
    rows = [dict(r) for r in sorted(rows, key=lambda r: r["seq"])]
    if renumber:
        new_seq = {r["seq"]: i for i, r in enumerate(rows, 1)}
        for r in rows:
            r["seq"] = new_seq[r["seq"]]
            if r["duplicate_of"] is not None:
                r["duplicate_of"] = new_seq.get(r["duplicate_of"], r["duplicate_of"])
    prev = GENESIS_HASH
    for r in rows:
        r["payload_sha256"] = payload_sha256(r["payload"])
        r["chain_hash"] = prev = chain_hash(prev, r["seq"], r["received_at"], r["source"], r["payload_sha256"],
                                            r["duplicate_of"], r["quarantine_reason"], r["kind"], r["session"])
    conn.execute(delete(event_log))
    if rows:
        conn.execute(insert(event_log), rows)
    recount(conn, rows)
    head = rows[-1]["seq"] if rows else 0
    conn.execute(update(imported_files).where(imported_files.c.last_seq > head).values(last_seq=head))


def recount(conn, rows: list[dict]) -> None:
    """event_log_counts as log.py would keep them for ``rows``."""
    counted = Counter((r["kind"], r["quarantine_reason"] or "", r["duplicate_of"] is not None) for r in rows)
    conn.execute(delete(event_log_counts))
    if counted:
        conn.execute(insert(event_log_counts), [{"kind": k, "quarantine_reason": q, "duplicate": d, "rows": n}
                                                for (k, q, d), n in counted.items()])


def tamper(url: str, edit, renumber: bool = False, rebuild: bool = True) -> None:
    """``edit`` the log's rows (a list of dicts, changed in place or returned), re-chain, cover up
    and (``rebuild``) recompute the projections from the altered log."""
    with behind_the_back(url) as conn:
        rows = log_of(conn)
        rows = edit(rows) or rows
        rewrite_log(conn, rows, renumber)
    if rebuild:
        run("rebuild", "--db", url)


def edit_payload(rows: list[dict], seq: int) -> None:
    """A believable edit: the row's payload says something else (still a message of the same
    workitem and type, so the projections read it)."""
    row = next(r for r in rows if r["seq"] == seq)
    message = json.loads(row["payload"])
    message["data"]["workitem"]["userData"] = {"Subject": "tampered"}
    row["payload"] = json.dumps(message)


def seals_in_table(url: str) -> list[dict]:
    engine = open_store(url)
    with engine.connect() as conn:
        found = [dict(r._mapping) for r in conn.execute(select(seals_table).order_by(seals_table.c.n))]
    engine.dispose()
    return found


# -- a sealed store ----------------------------------------------------------------------------------

def simulated(path: Path, events: int, seed: int) -> Path:
    start = dt.datetime(2026, 11, 1 + seed, 8, tzinfo=dt.UTC)  # each file a day after the one before
    path.write_text("".join(line + "\n" for line in simulate(events, seed=seed, start=start, error_rate=0.1,
                                                                 duplicate_rate=0.05)))
    return path


SEALED_FILES = (("a", 40, 1, True), ("b", 20, 2, True), ("c", 20, 3, True), ("d", 10, 4, False))


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def sealed_store(request, tmp_path_factory):
    """Made once per engine (each test gets a copy, ``sealed``): a store of 90 rows sealed three
    times (seq 40, 60, 80), with a witness file; rows 81-90 come after the last seal."""
    kind = request.param
    if kind == "postgresql":
        request.getfixturevalue("pg_admin")  # skips (or fails under CI) without a server
    directory = tmp_path_factory.mktemp(f"sealed-{kind}")
    made = SimpleNamespace(kind=kind, key=directory / "seal.key", pub=directory / "seal.key.pub",
                           witness=directory / "witness.jsonl")
    run("keygen", made.key)
    key = seals.load_private_key(made.key)
    with fresh_url(kind) as url:
        engine = open_store(url)
        try:
            for name, events, seed, seal_after in SEALED_FILES:
                files.import_file(engine, simulated(directory / f"{name}.jsonl", events, seed))
                runner.project(engine)
                if seal_after:
                    seals.seal(engine, key, made.witness)
        finally:
            engine.dispose()  # (no connection left: PostgreSQL copies only a database nobody uses)
        made.url = url
        yield made


@pytest.fixture
def sealed(sealed_store, tmp_path):
    """A copy of ``sealed_store`` (its database and witness file) for one test to tamper with."""
    s = SimpleNamespace(key=sealed_store.key, pub=sealed_store.pub, witness=tmp_path / "witness.jsonl")
    shutil.copyfile(sealed_store.witness, s.witness)
    if sealed_store.kind == "sqlite":
        s.url = f"sqlite:///{tmp_path / 'store.db'}"
        source, copy = sqlite3.connect(make_url(sealed_store.url).database), sqlite3.connect(tmp_path / "store.db")
        source.backup(copy)
        source.close()
        copy.close()
        yield s
        return
    # (a copy: PostgreSQL's CREATE DATABASE ... TEMPLATE, of a database nobody is connected to)
    with new_database(template=make_url(sealed_store.url).database) as url:
        s.url = url
        yield s


def verify_ok(s, *options) -> str:
    return run("verify", "--db", s.url, "--witness", s.witness, "--public-key", s.pub, *options).output


def verify_fails(s, *options) -> tuple[list[str], dict]:
    """`verify --witness --public-key` exits 1: its text report's lines, and its --json report."""
    result = run("verify", "--db", s.url, "--witness", s.witness, "--public-key", s.pub, *options, ok=None)
    assert result.exit_code == 1, result.output
    report = json.loads(run("verify", "--db", s.url, "--witness", s.witness, "--public-key", s.pub, "--json",
                            *options, ok=None).output)
    assert report["ok"] is False
    return result.output.splitlines(), report


def problems(report: dict) -> dict[int | None, str]:
    """The seals' problems by seal number (None: the witness file's), several joined by " | "."""
    found: dict[int | None, str] = {}
    for p in report["seals"]["problems"]:
        found[p["n"]] = " | ".join(filter(None, [found.get(p["n"]), p["problem"]]))
    return found


# -- an untouched store ------------------------------------------------------------------------------

def test_an_untouched_sealed_store_verifies(sealed):
    out = verify_ok(sealed)
    assert out.splitlines()[0].startswith("seals ok: 3 seals, signatures checked, newest 3 at seq 80")
    assert "chain ok: 90 rows, head seq 90" in out and "projections ok" in out
    report = json.loads(verify_ok(sealed, "--json"))
    assert report["ok"] is True and report["truncated"] == []
    assert report["seals"]["problems"] == [] and report["seals"]["in_witness"] == 3
    assert report["seals"]["last_valid"]["n"] == 3 and report["seals"]["last_valid"]["seq"] == 80
    # The witness file holds the very seals of the table, each signed by the key, linked in order.
    lines = sealed.witness.read_text().splitlines()
    in_table = seals_in_table(sealed.url)
    assert [json.loads(line) for line in lines] == [{"format": seals.FORMAT, **row} for row in in_table]
    assert [(r["n"], r["seq"], r["rows"], r["witnessed"]) for r in in_table] == [
        (1, 40, 40, True), (2, 60, 60, True), (3, 80, 80, True)]
    public = seals.load_public_key(sealed.pub)
    chained = [seals.Seal.from_line(line) for line in lines]
    assert all(s.signed_by(public) for s in chained)
    assert [s.prev for s in chained] == [seals.NO_SEAL, chained[0].digest(), chained[1].digest()]


def test_import_seals_after_its_commit(db_url, tmp_path):
    run("keygen", tmp_path / "k")
    witness = tmp_path / "w.jsonl"
    out = run("import", simulated(tmp_path / "a.jsonl", 12, 1), "--seal-key", tmp_path / "k", "--witness", witness,
              "--db", db_url).output
    assert "sealed: seal 1, seq 12" in out and "(in the seals table and the witness file)" in out
    report = json.loads(run("import", simulated(tmp_path / "b.jsonl", 8, 2), "--json", "--db", db_url,
                            env={seals.KEY_ENV: str(tmp_path / "k"), seals.WITNESS_ENV: str(witness)}).output)
    assert (report["seal"]["n"], report["seal"]["seq"], report["seal"]["rows"]) == (2, 20, 20)
    assert len(witness.read_text().splitlines()) == 2
    out = run("verify", "--db", db_url, "--witness", witness, "--public-key", tmp_path / "k.pub").output
    assert out.startswith("seals ok: 2 seals, signatures checked, newest 2 at seq 20")
    result = run("import", simulated(tmp_path / "c.jsonl", 3, 3), "--witness", witness, "--db", db_url, ok=False)
    assert result.output.startswith("Error: a witness file is configured but no seal key")
    assert len(seals_in_table(db_url)) == 2


@pytest.mark.postgres
def test_a_seal_is_of_one_moment_while_another_process_appends(pg_url, tmp_path, monkeypatch):
    """PostgreSQL gives each statement of a transaction its own snapshot (READ COMMITTED): the
    head and the row count that a seal states must still be of one moment."""
    engine, other = open_store(pg_url), open_store(pg_url)
    feed(engine, [bare(data(wid=f"w{i}")) for i in range(5)])
    run("keygen", tmp_path / "k")
    original, appenders = log.head, []

    def head_then_an_append(conn):
        found = original(conn)
        if threading.current_thread() is threading.main_thread() and not appenders:
            appenders.append(threading.Thread(target=feed, args=(other, [bare(data(wid="late"))]),
                                              kwargs={"file_name": "late"}))
            appenders[0].start()
            appenders[0].join(timeout=0.5)  # (it waits for the seal's commit, or it is done)
        return found

    monkeypatch.setattr(log, "head", head_then_an_append)
    made = seals.seal(engine, seals.load_private_key(tmp_path / "k"))
    appenders[0].join()
    monkeypatch.undo()
    try:
        assert (made.seq, made.rows) == (5, 5)
        with engine.connect() as conn:
            assert log.head(conn)[0] == 6
            assert seal_check.check(conn, public_key=seals.load_public_key(tmp_path / "k.pub")).problems == []
    finally:
        engine.dispose()
        other.dispose()


# -- 1. a payload edited early, every later row re-chained ------------------------------------------

def test_an_early_payload_edit_with_a_full_rechain_breaks_every_later_seal(sealed):
    tamper(sealed.url, lambda rows: edit_payload(rows, 3))
    out = run("verify", "--db", sealed.url, ok=False).output  # without the witness: the store's own seals
    assert "chain ok: 90 rows" in out  # the re-chain holds: only the seals tell
    assert "projections ok" in out
    lines, report = verify_fails(sealed)
    assert lines[0].startswith("seals BROKEN: seal 1 (seq 40): the log no longer holds the sealed head")
    assert "the first row that differs is between seq 1 and 40" in lines[0]
    assert "the last seal that holds" not in lines[0]
    assert report["chain_break"] is None and report["seals"]["last_valid"] is None
    assert set(problems(report)) == {1, 2, 3}
    assert all("no longer holds the sealed head" in p for p in problems(report).values())


# -- 2. the last rows deleted, the projections rebuilt ----------------------------------------------

def test_deleting_the_last_rows_then_rebuild_is_truncation_past_a_seal(sealed):
    tamper(sealed.url, lambda rows: rows[:70])
    lines, report = verify_fails(sealed)
    assert lines[0].startswith("seals BROKEN: seal 3 (seq 80): the log is TRUNCATED: the seal covers seq 80 "
                               "but the log ends at seq 70")
    assert "the last seal that holds is 2 (seq 60)" in lines[0]
    assert "\nchain ok: 70 rows, head seq 70 " in "\n".join(lines)
    assert list(problems(report)) == [3] and report["seals"]["last_valid"]["n"] == 2
    assert report["truncated"] == []  # imported_files and the counts were covered up: the seal tells
    assert report["differences"] == {}
    lines, report = verify_fails(sealed, "--since-last-seal")
    assert lines[0].startswith("seals BROKEN: seal 3 (seq 80): the log is TRUNCATED")
    assert report["since_seal"] == 2 and report["rows"] == 10


def test_a_shortened_log_without_any_seal_is_truncated_not_a_projection_difference(db_url, tmp_path):
    run("import", simulated(tmp_path / "a.jsonl", 30, 1), "--db", db_url)
    run("import", simulated(tmp_path / "b.jsonl", 20, 2), "--db", db_url)
    with behind_the_back(db_url) as conn:  # the last rows deleted, the counts made to agree
        conn.execute(delete(event_log).where(event_log.c.seq > 45))
        recount(conn, log_of(conn))
    run("rebuild", "--db", db_url)
    out = run("verify", "--db", db_url, ok=False).output
    lines = out.splitlines()
    assert lines[0].startswith("no seals")
    assert lines[1] == "log TRUNCATED: it ends at seq 45 but imported_files records rows up to seq 50"
    assert "chain ok: 45 rows, head seq 45" in out
    assert "DIFFERS" not in out and "projections ok" in out
    report = json.loads(run("verify", "--json", "--db", db_url, ok=False).output)
    assert report["ok"] is False and report["truncated"] == [{"table": "imported_files", "seq": 50}]
    assert report["differences"] == {} and report["counts_mismatch"] == [] and report["lagging"] == {}


def test_a_shortened_log_is_truncated_by_everything_the_store_remembers(db_url, tmp_path):
    run("import", simulated(tmp_path / "a.jsonl", 30, 1), "--db", db_url)
    with behind_the_back(db_url) as conn:  # nothing covered up, not even rebuilt
        conn.execute(delete(event_log).where(event_log.c.seq > 25))
    report = json.loads(run("verify", "--json", "--db", db_url, ok=False).output)
    assert report["truncated"] == [{"table": t, "seq": 30}
                                   for t in ("imported_files", "projection_checkpoints", "event_log_counts")]
    out = run("verify", "--db", db_url, ok=False).output
    assert out.splitlines()[1] == "log TRUNCATED: it ends at seq 25 but imported_files records rows up to seq 30"


def test_an_empty_log_remembering_rows_is_truncated(db_url, tmp_path):
    run("import", simulated(tmp_path / "a.jsonl", 5, 1), "--db", db_url)
    with behind_the_back(db_url) as conn:
        rewrite_log(conn, [])
        conn.execute(update(imported_files).values(last_seq=5))  # (rewrite_log lowered it: put it back)
    run("rebuild", "--db", db_url)
    report = json.loads(run("verify", "--json", "--db", db_url, ok=False).output)
    assert report["truncated"] == [{"table": "imported_files", "seq": 5}]


# -- 3. a middle row deleted ----------------------------------------------------------------------

def test_a_middle_row_deleted_and_the_rest_renumbered_and_rechained(sealed):
    tamper(sealed.url, lambda rows: [r for r in rows if r["seq"] != 50], renumber=True)
    lines, report = verify_fails(sealed)
    assert lines[0].startswith("seals BROKEN: seal 2 (seq 60): the log no longer holds the sealed head")
    assert "the last seal that holds is 1 (seq 40)" in lines[0]
    assert "the first row that differs is between seq 41 and 60" in lines[0]
    assert "\nchain ok: 89 rows, head seq 89 " in "\n".join(lines)
    assert report["chain_break"] is None and set(problems(report)) == {2, 3}
    assert report["seals"]["last_valid"]["n"] == 1


def test_a_middle_row_deleted_without_renumbering_and_rechained(sealed):
    tamper(sealed.url, lambda rows: [r for r in rows if r["seq"] != 50])
    lines, report = verify_fails(sealed)
    assert lines[0].startswith("seals BROKEN: seal 2 (seq 60)")
    assert "the first row that differs is seq 50" in lines[0]
    assert "chain BROKEN at seq 50: seq expected 50, found 51" in lines
    assert report["chain_break"] == {"seq": 50, "what": "seq", "expected": "50", "found": "51"}
    assert set(problems(report)) == {2, 3}


def test_a_sealed_row_itself_deleted(sealed):
    tamper(sealed.url, lambda rows: [r for r in rows if r["seq"] != 60])
    lines, report = verify_fails(sealed)
    assert lines[0].startswith("seals BROKEN: seal 2 (seq 60)")
    assert set(problems(report)) == {2, 3}


# -- 4. two rows swapped -------------------------------------------------------------------------

def test_a_swapped_pair_of_rows(sealed):
    def swap(rows):
        a, b = rows[60], rows[61]  # seq 61 and 62, after seal 2 and before seal 3
        assert a["payload"] != b["payload"]
        a["payload"], b["payload"] = b["payload"], a["payload"]
    tamper(sealed.url, swap)
    lines, report = verify_fails(sealed)
    assert lines[0].startswith("seals BROKEN: seal 3 (seq 80): the log no longer holds the sealed head")
    assert "the last seal that holds is 2 (seq 60)" in lines[0]
    assert "the first row that differs is between seq 61 and 80" in lines[0]
    assert list(problems(report)) == [3] and report["chain_break"] is None


# -- 5. forged seals -------------------------------------------------------------------------------

def edit_witness(path: Path, n: int, **changes) -> None:
    lines = path.read_text().splitlines()
    seal = json.loads(lines[n - 1])
    seal.update(changes)
    lines[n - 1] = json.dumps(seal, separators=(",", ":"))
    path.write_text("".join(line + "\n" for line in lines))


def test_a_seal_edited_in_the_table(sealed):
    with behind_the_back(sealed.url, "seals") as conn:
        conn.execute(update(seals_table).where(seals_table.c.n == 2).values(seq=61, rows=61))
    lines, report = verify_fails(sealed)
    assert lines[0].startswith("seals BROKEN: seal 2 (seq ")
    assert "the witness file and the store's seals table disagree" in problems(report)[2]
    assert report["seals"]["last_valid"]["n"] == 1
    # Without the witness file, the signature tells.
    result = run("verify", "--db", sealed.url, "--public-key", sealed.pub, ok=False)
    assert result.output.startswith("seals BROKEN: seal 2 (seq 61): its signature does not verify")
    assert "differs" not in result.output.splitlines()[0]


def test_a_seal_edited_alike_in_the_table_and_the_witness_file(sealed):
    # The attacker re-chained a payload edit, then moved seal 3's chain_hash to the new head.
    tamper(sealed.url, lambda rows: edit_payload(rows, 70))
    engine = open_store(sealed.url)
    with engine.connect() as conn:
        new_hash = conn.execute(select(event_log.c.chain_hash).where(event_log.c.seq == 80)).scalar_one()
    engine.dispose()
    with behind_the_back(sealed.url, "seals") as conn:
        conn.execute(update(seals_table).where(seals_table.c.n == 3).values(chain_hash=new_hash))
    edit_witness(sealed.witness, 3, chain_hash=new_hash)
    lines, report = verify_fails(sealed)
    assert lines[0].startswith("seals BROKEN: seal 3 (seq 80): its signature does not verify")
    assert list(problems(report)) == [3] and report["seals"]["last_valid"]["n"] == 2


def test_seals_made_again_with_another_key(sealed, tmp_path):
    """The attacker rewrites the log and every seal (table and witness file) with a key of their own."""
    tamper(sealed.url, lambda rows: edit_payload(rows, 3))
    with behind_the_back(sealed.url, "seals") as conn:
        conn.execute(delete(seals_table))
    sealed.witness.unlink()
    run("keygen", tmp_path / "mine.key")
    for _ in range(3):
        run("seal", "--key", tmp_path / "mine.key", "--witness", sealed.witness, "--db", sealed.url)
    # Checked with the attacker's key, or none, all holds; with the owner's public key it does not.
    run("verify", "--db", sealed.url, "--witness", sealed.witness, "--public-key", tmp_path / "mine.key.pub")
    out = run("verify", "--db", sealed.url, "--witness", sealed.witness).output
    assert "signatures NOT checked (no --public-key)" in out
    lines, report = verify_fails(sealed)
    assert lines[0].startswith("seals BROKEN: seal 1 (seq 90): its signature does not verify with the public key")
    assert set(problems(report)) == {1, 2, 3} and report["seals"]["last_valid"] is None
    assert report["seals"]["signatures_checked"] is True


def test_a_seal_signed_again_by_another_key(sealed, tmp_path):
    """Seal 2 replaced by one with the same fields signed by another key: in the witness file
    only, then in the table as well."""
    run("keygen", tmp_path / "mine.key")
    other = seals.load_private_key(tmp_path / "mine.key")
    lines = sealed.witness.read_text().splitlines()
    forged = dataclasses.replace(seals.Seal.from_line(lines[1]), key_id=seals.key_id(other.public_key()))
    forged = dataclasses.replace(forged, signature=base64.b64encode(other.sign(forged.message())).decode())
    lines[1] = forged.line()
    sealed.witness.write_text("".join(line + "\n" for line in lines))
    out, report = verify_fails(sealed)
    assert out[0].startswith("seals BROKEN: seal 2 (seq 60): the witness file and the store's seals table disagree")
    assert problems(report) == {2: "the witness file and the store's seals table disagree on it"}
    with behind_the_back(sealed.url, "seals") as conn:
        conn.execute(update(seals_table).where(seals_table.c.n == 2).values(key_id=forged.key_id,
                                                                            signature=forged.signature))
    out, report = verify_fails(sealed)
    assert out[0].startswith(f"seals BROKEN: seal 2 (seq 60): its signature does not verify with the public key "
                             f"(forged, altered, or signed by another key {forged.key_id[:16]}")
    assert "the last seal that holds is 1 (seq 40)" in out[0] and "differs" not in out[0]
    assert list(problems(report)) == [2, 3]  # seal 3's prev is the digest of seal 2, key_id included
    assert problems(report)[3].startswith("does not link to the seal before it")


def test_a_witness_line_that_is_no_seal(sealed):
    with sealed.witness.open("a") as f:
        f.write('{"format": "workitem-store-seal/1", "n": 4}\n')
    lines, report = verify_fails(sealed)
    assert lines[0].startswith("seals BROKEN: witness line 4 is not a seal")
    assert problems(report)[None].startswith("witness line 4 is not a seal")


# -- 6. a witness file with a line removed ---------------------------------------------------------

@pytest.mark.parametrize(("removed", "holds"), [(2, 1), (3, 2)], ids=["middle", "last"])
def test_a_witness_file_with_a_line_removed(sealed, removed, holds):
    lines = sealed.witness.read_text().splitlines()
    del lines[removed - 1]
    sealed.witness.write_text("".join(line + "\n" for line in lines))
    lines, report = verify_fails(sealed)
    seq = {2: 60, 3: 80}[removed]
    assert lines[0].startswith(f"seals BROKEN: seal {removed} (seq {seq}): was written to a witness file but this "
                               "witness file lacks it")
    assert f"the last seal that holds is {holds} " in lines[0]
    assert "differs" not in lines[0]  # the log is whole: no row is said to differ
    assert list(problems(report)) == [removed]
    assert report["seals"]["last_valid"]["n"] == holds and report["seals"]["in_witness"] == 2


def test_a_seal_removed_from_the_witness_file_and_the_table(sealed):
    lines = sealed.witness.read_text().splitlines()
    sealed.witness.write_text(lines[0] + "\n" + lines[2] + "\n")
    with behind_the_back(sealed.url, "seals") as conn:
        conn.execute(delete(seals_table).where(seals_table.c.n == 2))
    lines, report = verify_fails(sealed)
    assert lines[0].startswith("seals BROKEN: seal 2: is missing: seals are numbered from 1 without gaps")
    assert list(problems(report)) == [2]
    assert report["seals"]["last_valid"]["n"] == 1


# -- verify --since-last-seal ------------------------------------------------------------------------

def test_a_seal_written_to_the_witness_but_never_committed_is_adopted_by_the_next_seal(sealed):
    """A `seal` killed between the witness file's fsync and its commit leaves a line the table
    lacks; the next seal must not take its number (two seals 4: verify would fail for ever) but
    add it to the table as it is and follow it."""
    key = seals.load_private_key(sealed.key)
    engine = open_store(sealed.url)
    with engine.connect() as conn:
        last = seals.table_seals(conn)[-1]
        seq, chain_hash = log.head(conn)
        unsigned = seals.Seal(store_id=seals.store_id(conn), n=last.n + 1, seq=seq, chain_hash=chain_hash, rows=seq,
                              sealed_at="2026-12-01T00:00:00.000000Z", witnessed=True, prev=last.digest(),
                              key_id=seals.key_id(key.public_key()))
    orphan = dataclasses.replace(unsigned, signature=base64.b64encode(key.sign(unsigned.message())).decode())
    seals.append_witness(sealed.witness, orphan)  # what the killed process left
    engine.dispose()
    assert "seals ok: 4 seals" in verify_ok(sealed)  # (a signed, linked seal in the witness file alone holds)
    run("seal", "--key", sealed.key, "--witness", sealed.witness, "--db", sealed.url)
    assert [s["n"] for s in seals_in_table(sealed.url)] == [1, 2, 3, 4, 5]
    assert seals_in_table(sealed.url)[3]["signature"] == orphan.signature
    assert "seals ok: 5 seals" in verify_ok(sealed)


def test_since_last_seal_checks_the_rows_after_the_newest_seal(sealed):
    out = verify_ok(sealed, "--since-last-seal")
    assert "chain ok from seal 3 (seq 80): 10 rows, head seq 90" in out
    assert "projections not compared (--since-last-seal)" in out
    report = json.loads(verify_ok(sealed, "--since-last-seal", "--json"))
    assert report["since_seal"] == 3 and report["rows"] == 10


def test_since_last_seal_does_not_read_rows_a_valid_seal_vouches_for(sealed):
    # A payload edited before the last seal, the chain left as it was: the seal still holds (it
    # vouches for chain_hash), so only the full verify, which recomputes every row, sees it.
    with behind_the_back(sealed.url) as conn:
        conn.execute(update(event_log).where(event_log.c.seq == 5).values(payload='{"data": {}}'))
    report = json.loads(verify_ok(sealed, "--since-last-seal", "--json"))
    assert report["ok"] is True and report["rows"] == 10
    lines, report = verify_fails(sealed)
    assert "chain BROKEN at seq 5: payload_sha256" in "\n".join(lines)


def test_since_last_seal_fails_on_a_row_edited_after_the_seal(sealed):
    with behind_the_back(sealed.url) as conn:
        conn.execute(update(event_log).where(event_log.c.seq == 85).values(payload='{"data": {}}'))
    lines, report = verify_fails(sealed, "--since-last-seal")
    assert lines[0].startswith("seals ok: 3 seals")
    assert "chain BROKEN at seq 85: payload_sha256" in "\n".join(lines)
    assert report["chain_break"]["seq"] == 85 and report["since_seal"] == 3


def test_since_last_seal_starts_at_the_last_seal_that_holds(sealed):
    tamper(sealed.url, lambda rows: edit_payload(rows, 70))  # breaks seal 3 only
    with behind_the_back(sealed.url) as conn:
        conn.execute(update(event_log).where(event_log.c.seq == 65).values(payload='{"data": {}}'))
    lines, report = verify_fails(sealed, "--since-last-seal")
    assert lines[0].startswith("seals BROKEN: seal 3 (seq 80)")
    assert report["since_seal"] == 2 and report["chain_break"]["seq"] == 65


def test_a_null_quarantine_reason_made_empty_is_found_by_the_full_verify(sealed):
    # The chain hashes NULL and "" alike (docs/RULES.md section 8), so the seals still hold; but
    # the row is no longer projectable, and the counts kept with each append (which cannot tell
    # "" from NULL either, so no cover-up fits) no longer agree with the log.
    with behind_the_back(sealed.url) as conn:
        conn.execute(update(event_log).where(event_log.c.seq == 5).values(quarantine_reason=""))
    run("rebuild", "--db", sealed.url)
    lines, report = verify_fails(sealed)
    assert lines[0].startswith("seals ok") and report["chain_break"] is None
    assert {(c["quarantine_reason"], c["counted"] - c["recorded"]) for c in report["counts_mismatch"]} == {
        ("", 1), (None, -1)}
    assert report["column_mismatch"] == {"seq": 5, "what": "quarantine_reason", "expected": "NULL or a reason",
                                         "found": "''"}
    # The daily check finds it too when the row is after the last seal.
    with behind_the_back(sealed.url) as conn:
        conn.execute(update(event_log).where(event_log.c.seq == 85).values(quarantine_reason=""))
    lines, report = verify_fails(sealed, "--since-last-seal")
    assert report["column_mismatch"]["seq"] == 85


# -- property: any one row changed under a seal, re-chained, is found ------------------------------

FIELDS = ["payload", "received_at", "source", "duplicate_of", "quarantine_reason", "kind", "session", "seq"]


def _changed(row: dict, field: str, draw) -> dict:
    """``row`` with ``field`` changed so that its chained content changes."""
    row = dict(row)
    value = row[field]
    if field == "payload":
        row["payload"] = draw(st.sampled_from([value + " ", value.replace("1", "2", 1) + "\n", "x" + value]))
    elif field == "received_at":
        row["received_at"] = value + dt.timedelta(microseconds=draw(st.sampled_from([-1, 1, 10**6, 86400 * 10**6])))
    elif field == "source":
        row["source"] = draw(st.sampled_from([value + "x", value.upper() + "!", "agent-666"]))
    elif field == "duplicate_of":
        row["duplicate_of"] = draw(st.integers(1, 99)) if value is None else None
    elif field == "quarantine_reason":  # (NULL and "" hash alike: the change must be to a text)
        row["quarantine_reason"] = "tampered" if not value else None
    elif field == "kind":
        row["kind"] = draw(st.sampled_from(["snapshot", "session"])) if value == "notification" else "notification"
    elif field == "session":
        row["session"] = "s-666" if not value else None
    else:
        row["seq"] = value + 1000  # moved past the end
    return row


@pytest.fixture(scope="module")
def seal_keys(tmp_path_factory):
    """A key pair for the property test below (made once): (private key, public key file)."""
    directory = tmp_path_factory.mktemp("keys")
    run("keygen", directory / "k")
    return seals.load_private_key(directory / "k"), directory / "k.pub"


@on_both_engines(stream(), st.data(), sqlite=10, postgresql=3)
def test_any_one_row_changed_under_a_seal_is_found(engine_kind, seal_keys, generated, draw):
    key, pub = seal_keys
    lines, batches = generated
    sealed_after = draw.draw(st.lists(st.booleans(), min_size=len(batches), max_size=len(batches)))
    sealed_after[-1 if not any(sealed_after) else 0] = True
    with fresh_store(engine_kind) as engine, tempfile.TemporaryDirectory() as tmp:
        url = engine.url.render_as_string(hide_password=False)
        witness = Path(tmp) / "w.jsonl"
        start, last_sealed = 0, 0
        for (end, source, _), seal_now in zip(batches, sealed_after, strict=True):
            feed(engine, lines[start:end], source=source, file_name=f"batch-{start}")
            start = end
            if seal_now and draw.draw(st.booleans()):
                last_sealed = seals.seal(engine, key, witness).seq
            elif seal_now:
                last_sealed = seals.seal(engine, key).seq  # (the seals table only)
        if not witness.exists():
            witness.write_text("")
        seq = draw.draw(st.integers(1, last_sealed))
        field = draw.draw(st.sampled_from(FIELDS))
        with behind_the_back(url) as conn:
            rows = log_of(conn)
            rows[seq - 1] = changed = _changed(rows[seq - 1], field, draw.draw)
            rewrite_log(conn, rows)
        result = run("verify", "--db", url, "--witness", witness, "--public-key", pub, ok=None)
        assert result.exit_code == 1, (field, changed, result.output)
        assert result.output.startswith("seals BROKEN: seal "), result.output


# -- keys ----------------------------------------------------------------------------------------

def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    key = tmp_path / "seal.key"
    out = run("keygen", key).output
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    public = seals.load_public_key(tmp_path / "seal.key.pub")
    assert f"key id:      {seals.key_id(public)}" in out
    assert seals.key_id(seals.load_private_key(key).public_key()) == seals.key_id(public)
    before = key.read_bytes(), (tmp_path / "seal.key.pub").read_bytes()
    result = run("keygen", key, ok=False)
    assert result.output.startswith(f"Error: {key} exists: keygen never overwrites a key")
    assert (key.read_bytes(), (tmp_path / "seal.key.pub").read_bytes()) == before
    key.unlink()  # only the public key is left: still refused (the pair would not match)
    result = run("keygen", key, ok=False)
    assert result.output.startswith(f"Error: {key}.pub exists") and not key.exists()
    result = run("keygen", tmp_path / "no-such-dir" / "k", ok=False)
    assert result.output.startswith("Error: ") and "Traceback" not in result.output


def test_keygen_never_writes_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    (tmp_path / "k.pub").symlink_to(target)
    result = run("keygen", tmp_path / "k", ok=False)
    assert result.output.startswith("Error: ") and target.read_text() == "keep me"
    (tmp_path / "d.pub").symlink_to(tmp_path / "nowhere")  # dangling: exists() is False
    result = run("keygen", tmp_path / "d", ok=False)
    assert result.output.startswith(f"Error: cannot write {tmp_path / 'd.pub'}")
    assert not (tmp_path / "nowhere").exists()
    assert not (tmp_path / "d").exists()  # no private key left without its public key


def test_seal_refuses_a_key_others_can_read(db_url, tmp_path):
    run("import", simulated(tmp_path / "a.jsonl", 5, 1), "--db", db_url)
    key = tmp_path / "seal.key"
    run("keygen", key)
    for mode in (0o640, 0o604, 0o644):
        key.chmod(mode)
        result = run("seal", "--key", key, "--db", db_url, ok=False)
        assert result.exit_code == 1
        assert result.output.startswith(f"Error: the seal key {key} is readable by other users")
        assert f"chmod 600 {key}" in result.output
        result = run("import", simulated(tmp_path / "b.jsonl", 3, 2), "--seal-key", key, "--db", db_url, ok=False)
        assert result.output.startswith("Error: ") and "readable by other users" in result.output
    assert seals_in_table(db_url) == []
    key.chmod(0o600)
    assert "sealed: seal 1, seq 5" in run("seal", "--key", key, "--db", db_url).output


def test_a_missing_or_unusable_key_is_a_clear_error(db_url, tmp_path):
    run("import", simulated(tmp_path / "a.jsonl", 5, 1), "--db", db_url)
    run("keygen", tmp_path / "good.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    garbage.chmod(0o600)
    public_as_private = tmp_path / "pub-as-private.key"
    public_as_private.write_bytes((tmp_path / "good.key.pub").read_bytes())
    public_as_private.chmod(0o600)
    cases = {tmp_path / "missing.key": "cannot read the seal key",
             tmp_path: "",  # a directory
             garbage: "is not an unencrypted PEM private key",
             public_as_private: "is not an unencrypted PEM private key"}
    for path, words in cases.items():
        result = run("seal", "--key", path, "--db", db_url, ok=False)
        assert result.exit_code in (1, 2) and result.output.startswith(("Error: ", "Usage: ")), result.output
        assert words in result.output and "Traceback" not in result.output
    result = run("seal", "--db", db_url, ok=False, env={seals.KEY_ENV: None})
    assert "Missing option '--key'" in result.output
    # verify's --public-key: a private key, garbage
    for path in (tmp_path / "good.key", garbage):
        result = run("verify", "--db", db_url, "--public-key", path, ok=False)
        assert result.output.startswith(f"Error: {path} is not a PEM public key"), result.output
    assert seals_in_table(db_url) == []


def test_seal_with_an_unwritable_witness_file_seals_nothing(db_url, tmp_path):
    run("import", simulated(tmp_path / "a.jsonl", 5, 1), "--db", db_url)
    run("keygen", tmp_path / "k")
    result = run("seal", "--key", tmp_path / "k", "--witness", tmp_path / "no-such-dir" / "w.jsonl", "--db", db_url,
                 ok=False)
    assert result.output.startswith("Error: cannot append to the witness file")
    assert seals_in_table(db_url) == []
    made = json.loads(run("seal", "--key", tmp_path / "k", "--witness", tmp_path / "w.jsonl", "--json",
                          "--db", db_url).output)
    assert made["n"] == 1 and made["prev"] == seals.NO_SEAL and made["witnessed"] is True


def test_an_empty_store_can_be_sealed_and_verified(db_url, tmp_path):
    run("init", "--db", db_url)
    run("keygen", tmp_path / "k")
    made = json.loads(run("seal", "--key", tmp_path / "k", "--witness", tmp_path / "w", "--json", "--db",
                          db_url).output)
    assert (made["seq"], made["rows"], made["chain_hash"]) == (0, 0, GENESIS_HASH)
    run("verify", "--db", db_url, "--witness", tmp_path / "w", "--public-key", tmp_path / "k.pub")


def test_a_seal_of_another_store_is_refused(db_url, tmp_path):
    s = SimpleNamespace(url=db_url, pub=tmp_path / "k.pub", witness=tmp_path / "w.jsonl")
    run("keygen", tmp_path / "k")
    run("import", simulated(tmp_path / "a.jsonl", 5, 1), "--db", db_url)
    run("seal", "--key", tmp_path / "k", "--witness", s.witness, "--db", db_url)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    run("import", simulated(tmp_path / "a.jsonl", 5, 1), "--db", other)  # the same rows, another store
    run("seal", "--key", tmp_path / "k", "--witness", tmp_path / "other.jsonl", "--db", other)
    with s.witness.open("a") as f:
        f.write((tmp_path / "other.jsonl").read_text())
    lines, report = verify_fails(s)
    assert lines[0].startswith("seals BROKEN: seal 1 (seq 5): is a seal of another store")
    assert [p["n"] for p in report["seals"]["problems"]] == [1]


def test_a_witness_file_of_another_store_given_to_an_unsealed_store(db_url, tmp_path):
    run("keygen", tmp_path / "k")
    run("import", simulated(tmp_path / "a.jsonl", 5, 1), "--db", db_url)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    run("import", simulated(tmp_path / "a.jsonl", 5, 1), "--db", other)
    run("seal", "--key", tmp_path / "k", "--witness", tmp_path / "w.jsonl", "--db", other)
    with (tmp_path / "w.jsonl").open("a") as f:
        f.write("not a seal\n")
    s = SimpleNamespace(url=db_url, pub=tmp_path / "k.pub", witness=tmp_path / "w.jsonl")
    lines, report = verify_fails(s)  # the store has no seal of its own: the file is still not its witness
    assert lines[0].startswith("seals BROKEN: ")
    assert "is a seal of another store" in "\n".join(lines) and "witness line 2 is not a seal" in "\n".join(lines)
    assert len(report["seals"]["problems"]) == 2


# -- the tables of seals are append-only -------------------------------------------------------------

def test_seals_and_store_identity_refuse_update_and_delete(engine, tmp_path):
    feed(engine, [bare(data())])
    run("keygen", tmp_path / "k")
    seals.seal(engine, seals.load_private_key(tmp_path / "k"))
    statements = ["UPDATE seals SET seq = 0", "DELETE FROM seals",
                  "UPDATE store_identity SET store_id = 'other'", "DELETE FROM store_identity"]
    if engine.dialect.name == "postgresql":
        statements += ["TRUNCATE seals", "TRUNCATE store_identity"]
    for statement in statements:
        with pytest.raises(DBAPIError, match="append-only"):
            with engine.begin() as conn:
                conn.execute(text(statement))
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(seals_table)).scalar_one() == 1
        assert conn.execute(select(func.count()).select_from(store_identity)).scalar_one() == 1
        assert conn.execute(select(seals_table.c.seq)).scalar_one() == 1
