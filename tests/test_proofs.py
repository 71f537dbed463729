"""Offline proofs of one row (``prove`` / ``check-proof``, store/proofs.py), on both engines.

A proof made from the store checks with the public key alone, whatever the row (first, middle,
the sealed row itself, markers, snapshots, quarantined lines, duplicates, non-ASCII payloads), and
stays valid while the log grows; any change to its bytes (one flipped byte anywhere, a truncation,
an appended byte, a link removed or moved, a seal of another key) makes the check fail, with a
result, never an exception.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import at, bayeux, data, envelope, feed, live, log_rows, marker, run, snapshot, started
from sqlalchemy import select

from store import proofs, seals
from store.bulk import insert_rows
from store.db import open_store, write_transaction
from store.log import chain_hash
from store.schema import seals as seals_table

SESSION = "i1/agent-1/1"
NON_ASCII = "Zoë ✓ 😀 \u2028 日本"  # two-byte, three-byte, astral (a surrogate pair once escaped), LS


def raw(d: dict, mid: str) -> str:
    """A Bayeux message with its non-ASCII characters as they are (not \\u escapes)."""
    return json.dumps({"channel": "/v2/me/workitems", "id": mid, "data": d}, ensure_ascii=False)


# Up to seal 1 (seq 9): every kind of chained field; row 6 (non-ASCII) has 3 links before the seal:
# a duplicate (duplicate_of), a quarantined line (quarantine_reason), a session marker (kind, session).
FIRST = [
    envelope(bayeux(data("StatusChange", "W1", state="Invited"), mid="1"), "agent-1", at(0)),      # 1
    envelope(bayeux(data("StatusChange", "W1", state="Processing"), mid="2"), "agent-1", at(1)),   # 2
    started("agent-1", SESSION, at(2)),                                                             # 3 session
    snapshot("agent-1", SESSION, at(3), [{"id": "W1", "state": "Processing"}]),                    # 4 snapshot
    live(data("StatusChange", "W1", state="Completed"), "agent-1", SESSION, at(4)),                # 5 live
    envelope(raw(data("StatusChange", "W2", state=NON_ASCII), "3"), "agent-1", at(5)),              # 6
    envelope(bayeux(data("StatusChange", "W1", state="Invited"), mid="1"), "agent-1", at(6)),      # 7 duplicate
    f"not json {NON_ASCII}",                                                                        # 8 quarantined
    marker("agent-1", SESSION, "ended", at(8)),                                                     # 9 session
]
# After seal 1, up to seal 2 (seq 15): odd payloads the proof must carry byte-exact.
SECOND = [
    envelope(bayeux(data("StatusChange", "W3", state=NON_ASCII), mid="4"), "agent-1", at(10)),  # \u escapes as text
    ('{"channel": "/v2/me/workitems", "id": "5",  "data" : {"messageType": "WorkitemStateChangeMessage", '
     '"notificationType": "StatusChange", "workitem": {"state": "a\\"b\\\\c\\t</script>", "id": "W4"}}  }'),
    '{"channel": "/v2/me/workitems", "id": "6", "data": {"x": "\\ud800"}}',  # a lone surrogate: quarantined
    "\t  {not json either} \u00a0",
    envelope(bayeux(data("Deleted", "W4"), mid="7"), "agent-2", at(14)),
]
RAW_BYTES = b"\xff\xfe not UTF-8 \xc3"  # seq 15, quarantined (the store keeps its bytes as escapes)
LATER = [envelope(bayeux(data("Deleted", "W2"), mid="8"), "agent-1", at(20))]  # seq 16-17: no seal yet


@pytest.fixture
def keys(tmp_path):
    private_path, public_path = seals.keygen(tmp_path / "seal.key")
    return SimpleNamespace(path=private_path, pub=public_path, private=seals.load_private_key(private_path),
                           public=seals.load_public_key(public_path))


@pytest.fixture
def store(db_url, keys):
    """9 rows, seal 1, 6 rows, seal 2, 2 rows not sealed; on each engine."""
    yield from _store(db_url, keys)


@pytest.fixture
def sqlite_store(tmp_path, keys):
    """The same store on SQLite only, for tests of ``check`` alone (the proof's bytes are the same)."""
    yield from _store(f"sqlite:///{tmp_path / 'store.db'}", keys)


def _store(db_url, keys):
    engine = open_store(db_url)
    feed(engine, FIRST, file_name="first")
    first = seals.seal(engine, keys.private)
    feed(engine, [*SECOND, RAW_BYTES], file_name="second")
    second = seals.seal(engine, keys.private)
    feed(engine, [*LATER, "unsealed garbage"], file_name="later")
    with engine.connect() as conn:
        rows = {r["seq"]: r for r in log_rows(conn)}
    yield SimpleNamespace(url=db_url, engine=engine, rows=rows, seals=[first, second])
    engine.dispose()


def proof_of(store, seq: int) -> bytes:
    with store.engine.connect() as conn:
        return proofs.dumps(proofs.prove(conn, seq)).encode()


def redump(proof: dict) -> bytes:
    """A changed proof in the one written form, so that only its content is wrong."""
    return proofs.dumps(proof).encode()


def resign(seal: dict, key: Ed25519PrivateKey, **changes) -> dict:
    """The seal with ``changes``, validly signed by ``key`` (as its owner could)."""
    made = dataclasses.replace(seals.Seal.from_dict(seal), **changes, key_id=seals.key_id(key.public_key()))
    return dataclasses.replace(made, signature=base64.b64encode(key.sign(made.message())).decode()).as_dict()


def fails(data: bytes, public_key, *words: str) -> str:
    result = proofs.check(data, public_key)
    assert not result.ok, result
    for word in words:
        assert word in result.message, result.message
    return result.message


# -- round trips ---------------------------------------------------------------------------------

def test_the_store_holds_every_kind_of_chained_field(store):
    """(The premise of the tests below.)"""
    rows = store.rows
    assert [s.seq for s in store.seals] == [9, 15] and len(rows) == 17
    assert rows[7]["duplicate_of"] == 1
    assert rows[8]["quarantine_reason"] and rows[13]["quarantine_reason"] and rows[12]["quarantine_reason"]
    assert (rows[3]["kind"], rows[4]["kind"], rows[9]["kind"]) == ("session", "snapshot", "session")
    assert rows[5]["kind"] == "notification" and rows[5]["session"] == SESSION
    assert rows[1]["session"] is None and rows[1]["kind"] == "notification"
    assert NON_ASCII in rows[6]["payload"] and NON_ASCII in rows[8]["payload"]
    assert "\\u00eb" in rows[10]["payload"]  # the escapes as the line had them
    assert "  \"data\" : {" in rows[11]["payload"]  # the message's own text, spaces and all
    assert "not UTF-8" in rows[15]["payload"] and rows[15]["quarantine_reason"]  # (its bytes kept as escapes)


@pytest.mark.parametrize("seq, sealed_by, links", [
    (1, 9, 8),    # the first row: prev_chain_hash is sixty-four zeros
    (5, 9, 4),    # a middle row
    (9, 9, 0),    # the sealed row itself: no links
    (10, 15, 5),  # the first row after seal 1: proved by seal 2
])
def test_prove_and_check_proof_round_trip_through_the_cli(store, keys, tmp_path, seq, sealed_by, links):
    path = tmp_path / "proof.json"
    run("prove", seq, "-o", path, "--db", store.url)
    written = path.read_bytes()
    proof = json.loads(written)
    assert written.isascii() and written.endswith(b"\n") and written == proofs.dumps(proof).encode()
    assert proof["row"]["seq"] == seq and proof["seal"]["seq"] == sealed_by and len(proof["links"]) == links
    assert [link[0] for link in proof["links"]] == list(range(seq + 1, sealed_by + 1))
    assert proof["prev_chain_hash"] == ("0" * 64 if seq == 1 else store.rows[seq - 1]["chain_hash"])
    assert run("prove", seq, "--db", store.url).output.encode() == written  # to standard output: the same bytes

    result = run("check-proof", path, "--public-key", keys.pub)
    assert result.output.startswith(f"proof ok: row {seq} is in store ") and f"(seq {sealed_by}," in result.output
    as_json = json.loads(run("check-proof", path, "--public-key", keys.pub, "--json").output)
    assert as_json["ok"] is True and as_json["message"].startswith(f"row {seq} is in store")


def test_every_sealed_row_proves_with_its_stored_payload_byte_exact(store, keys):
    """Every row, through every kind of link; the payload as stored, whatever its characters."""
    kinds_seen = set()
    for seq, row in store.rows.items():
        if seq > store.seals[-1].seq:
            break
        written = proof_of(store, seq)
        assert written.isascii()  # non-ASCII travels as \u escapes ...
        proof = json.loads(written)
        assert proof["row"]["payload"] == row["payload"]  # ... and comes back as the stored text exactly
        assert proof["row"]["payload"].encode() == row["payload"].encode()
        result = proofs.check(written, keys.public)
        assert result.ok, (seq, result.message)
        for link in [[proof["row"][name] for name in proofs.LINK_FIELDS], *proof["links"]]:
            fields = dict(zip(proofs.LINK_FIELDS, link, strict=True))
            stored = store.rows[fields["seq"]]
            assert fields["chain_hash"] == stored["chain_hash"] and fields["kind"] == stored["kind"]
            kinds_seen |= {name for name in ("duplicate_of", "quarantine_reason", "session") if fields[name]}
            kinds_seen.add(fields["kind"])
    assert kinds_seen == {"duplicate_of", "quarantine_reason", "session", "notification", "snapshot"}
    assert "\\u00eb" in proof_of(store, 6).decode() and "\\ud83d\\ude00" in proof_of(store, 6).decode()


def test_a_proof_stays_valid_while_the_log_grows_and_is_sealed_again(store, keys):
    before = {seq: proof_of(store, seq) for seq in (2, 9, 12)}
    feed(store.engine, [envelope(bayeux(data("Deleted", "W9"), mid="90"), "agent-3", at(30))], file_name="more")
    seals.seal(store.engine, keys.private)
    feed(store.engine, ["more garbage"], file_name="more2")
    seals.seal(store.engine, keys.private)
    for seq, written in before.items():
        assert proofs.check(written, keys.public).ok
        assert proof_of(store, seq) == written  # still against the first seal at or after the row
    later = json.loads(proof_of(store, 17))  # was not provable before: now under seal 3
    assert later["seal"]["n"] == 3 and later["seal"]["seq"] == 18 and [link[0] for link in later["links"]] == [18]
    assert proofs.check(proof_of(store, 17), keys.public).ok


# -- refused proofs --------------------------------------------------------------------------------

def test_prove_without_a_covering_seal_or_row_is_a_clear_error(store, tmp_path):
    result = run("prove", 16, "-o", tmp_path / "p.json", "--db", store.url, ok=False)
    assert result.exit_code == 1 and "Error: no seal covers seq 16" in result.output
    result = run("prove", 99, "-o", tmp_path / "p.json", "--db", store.url, ok=False)
    assert result.exit_code == 1 and "Error: the log has no row with seq 99" in result.output
    assert not (tmp_path / "p.json").exists()  # nothing written
    assert run("prove", 0, "--db", store.url, ok=False).exit_code == 2  # a usage error


def test_prove_refuses_a_seal_the_log_does_not_reach(store, keys):
    """A seal beyond the log's head (the log was truncated): no proof that could never check."""
    head = max(store.rows)
    with write_transaction(store.engine) as conn:
        last = seals.Seal(**conn.execute(select(seals_table).order_by(seals_table.c.n.desc())).first()._mapping)
        forged = dataclasses.replace(last, n=last.n + 1, seq=head + 3, rows=head + 3, prev=last.digest())
        insert_rows(conn, seals_table, [dataclasses.asdict(forged)])
    with store.engine.connect() as conn, pytest.raises(proofs.ProofError, match="does not match the log"):
        proofs.prove(conn, head)


# -- any change fails --------------------------------------------------------------------------------

def test_every_single_byte_change_anywhere_fails(store, keys):
    """Row 6 (non-ASCII) and 3 links: each byte XOR each mask; then every character in the
    signature's last place (whose low bits base64 decoders ignore)."""
    written = proof_of(store, 6)
    assert proofs.check(written, keys.public).ok and len(json.loads(written)["links"]) == 3
    passed = []
    for position in range(len(written)):
        for mask in (0x01, 0x02, 0x04, 0x20, 0x40, 0x80):
            changed = bytearray(written)
            changed[position] ^= mask
            if proofs.check(bytes(changed), keys.public).ok:
                passed.append((position, mask, written[max(0, position - 20):position + 3]))
    assert passed == []

    # The signature's last character (before "==") holds 4 bits the base64 decoder ignores: 16
    # characters there decode to the same signature, and only the one the sealer wrote may check.
    signature = json.loads(written)["seal"]["signature"]
    assert signature.endswith("==")
    at = written.index(signature.encode()) + len(signature) - 3
    same_bytes = []
    for char in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/":
        changed = written[:at] + bytes([char]) + written[at + 1:]
        if base64.b64decode(changed[at - 85:at + 3]) == base64.b64decode(signature):
            same_bytes.append(char)
        if char != written[at]:
            fails(changed, keys.public)
    assert len(same_bytes) == 16


def test_truncated_or_extended_proofs_fail(sqlite_store, keys):
    written = proof_of(sqlite_store, 6)
    for length in range(len(written)):
        fails(written[:length], keys.public)
    for extra in (b"\n", b" ", b"\r", b"x", b"{}", b"\x00", "é".encode()):
        fails(written + extra, keys.public)
        fails(extra + written, keys.public)
    fails(written[:-1], keys.public)  # without its final newline
    fails(written.replace(b",", b", "), keys.public, "written form")  # the same JSON, spaced
    as_text = json.dumps(json.loads(written), sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    fails(as_text.encode(), keys.public, "written form")  # the same JSON, non-ASCII as UTF-8


def test_removed_reordered_or_swapped_parts_fail(sqlite_store, keys):
    proof = json.loads(proof_of(sqlite_store, 6))
    for i in range(3):
        without = copy.deepcopy(proof)
        del without["links"][i]
        fails(redump(without), keys.public)
    for order in ([1, 0, 2], [0, 2, 1], [2, 1, 0]):
        moved = copy.deepcopy(proof)
        moved["links"] = [proof["links"][i] for i in order]
        fails(redump(moved), keys.public, "chain breaks")
    repeated = copy.deepcopy(proof)
    repeated["links"].append(proof["links"][-1])
    fails(redump(repeated), keys.public)
    no_links = copy.deepcopy(proof)
    no_links["links"] = []
    fails(redump(no_links), keys.public)

    other = json.loads(proof_of(sqlite_store, 12))  # a proof against seal 2
    swapped = copy.deepcopy(proof)
    swapped["seal"] = other["seal"]  # a genuine seal, of another head
    fails(redump(swapped), keys.public)
    payload = copy.deepcopy(proof)
    payload["row"]["payload"] = sqlite_store.rows[7]["payload"]  # another row's payload, with its hash
    payload["row"]["payload_sha256"] = sqlite_store.rows[7]["payload_sha256"]
    fails(redump(payload), keys.public, "chain breaks at seq 6")
    prev = copy.deepcopy(proof)
    prev["prev_chain_hash"] = sqlite_store.rows[4]["chain_hash"]
    fails(redump(prev), keys.public, "chain breaks at seq 6")
    for name, value in (("quarantine_reason", "not JSON"), ("duplicate_of", 1), ("session", SESSION),
                        ("kind", "snapshot"), ("source", "agent-2"), ("received_at", "2026-11-02T08:00:05.000001Z")):
        field = copy.deepcopy(proof)
        field["row"][name] = value
        fails(redump(field), keys.public, "chain breaks at seq 6")


def test_a_seal_of_another_key_fails(store, keys, tmp_path):
    path = tmp_path / "proof.json"
    run("prove", 6, "-o", path, "--db", store.url)
    _, other_pub = seals.keygen(tmp_path / "other.key")
    result = run("check-proof", path, "--public-key", other_pub, ok=False)
    assert result.exit_code == 1 and "proof FAILS: seal 1's signature does not verify" in result.output
    assert json.loads(run("check-proof", path, "--public-key", other_pub, "--json", ok=False).output)["ok"] is False

    other = seals.load_private_key(tmp_path / "other.key")
    proof = json.loads(path.read_bytes())
    proof["seal"] = resign(proof["seal"], other)  # the same head, sealed by another key
    assert proofs.check(redump(proof), seals.load_public_key(other_pub)).ok
    fails(redump(proof), keys.public, "does not verify")
    unsigned = json.loads(path.read_bytes())
    unsigned["seal"]["signature"] = ""
    fails(redump(unsigned), keys.public, "does not verify")


def test_check_proof_of_files_that_are_not_proofs(sqlite_store, keys, tmp_path):
    for content in (b"", b"{}\n", b"[]\n", b"null\n", keys.pub.read_bytes(), b"\xff\xfe\n", b"[" * 100_000):
        path = tmp_path / "not-a-proof.json"
        path.write_bytes(content)
        result = run("check-proof", path, "--public-key", keys.pub, ok=False)
        assert result.exit_code == 1 and result.output.startswith("proof FAILS: "), result.output


# -- malformed proofs: a result, never an exception --------------------------------------------------

WRONG_VALUES = [True, False, None, -1, 0, 1.5, "6", [], {}, 2**70, "", "\ud800"]


def test_malformed_values_give_a_failed_result_never_an_exception(sqlite_store, keys):
    proof = json.loads(proof_of(sqlite_store, 6))
    cases = []
    for name in proofs.LINK_FIELDS + ("payload",):
        for value in WRONG_VALUES:
            changed = copy.deepcopy(proof)
            changed["row"][name] = value
            cases.append(changed)
            changed = copy.deepcopy(proof)
            changed["links"][0][proofs.LINK_FIELDS.index(name) if name != "payload" else 0] = value
            cases.append(changed)
    for name in ("format", "prev_chain_hash", "row", "links", "seal"):
        for value in WRONG_VALUES:
            changed = copy.deepcopy(proof)
            changed[name] = value
            cases.append(changed)
        missing = copy.deepcopy(proof)
        del missing[name]
        cases.append(missing)
    for name in proof["seal"]:
        for value in WRONG_VALUES:
            changed = copy.deepcopy(proof)
            changed["seal"][name] = value
            cases.append(changed)
    for value in (proof["links"][0][:-1], proof["links"][0] + [1], dict(enumerate(proof["links"][0])), "x" * 9,
                  list(proofs.LINK_FIELDS), 7, None):
        changed = copy.deepcopy(proof)
        changed["links"][0] = value
        cases.append(changed)
    extra = copy.deepcopy(proof)
    extra["row"]["comment"] = "x"
    cases.append(extra)
    cases.append(list(proof.values()))
    cases.append({**proof, "row": list(proof["row"])})
    written = redump(proof)
    for case in cases:
        if redump(case) != written:  # (a value it already had, such as "witnessed": false)
            fails(redump(case), keys.public)
    infinity = '{"format":"workitem-store-proof/1","links":[],"prev_chain_hash":Infinity,"row":{},"seal":{}}\n'
    for text in ('{"format":NaN}\n', infinity, "1" * 5000 + "\n"):
        fails(text.encode(), keys.public)


def test_validly_signed_seals_that_do_not_cover_the_row_fail(sqlite_store, keys):
    """Only what the key holder signed counts, and even a genuine signature covers only its own head."""
    proof = json.loads(proof_of(sqlite_store, 6))
    row = sqlite_store.rows
    below = copy.deepcopy(proof)  # a seal of seq 5, whose chain_hash it really is
    below["links"] = []
    below["seal"] = resign(proof["seal"], keys.private, seq=5, rows=5, chain_hash=row[5]["chain_hash"])
    fails(redump(below), keys.public, "the seal (seq 5) is before the row (seq 6)")
    short = copy.deepcopy(proof)  # a seal of seq 8, the links cut there
    short["links"] = proof["links"][:2]
    short["seal"] = resign(proof["seal"], keys.private, seq=8, rows=8, chain_hash=row[8]["chain_hash"])
    assert proofs.check(redump(short), keys.public).ok  # (a proof against a seal at seq 8 would hold)
    short["links"] = proof["links"]
    fails(redump(short), keys.public, "do not run from seq 6 to the sealed seq 8")
    negative = copy.deepcopy(proof)
    negative["row"]["seq"] = -6
    negative["seal"] = resign(proof["seal"], keys.private, seq=-3, rows=-3)
    fails(redump(negative), keys.public, "seq is not a positive integer")
    zero = json.loads(proof_of(sqlite_store, 1))  # seq 1 chains from sixty-four zeros, nothing else
    zero["prev_chain_hash"] = "f" * 64
    fails(redump(zero), keys.public, "prev_chain_hash")


def test_null_and_empty_text_are_not_two_forms_of_one_proof(sqlite_store, keys):
    """The chain hashes a NULL quarantine_reason as the empty string: a proof holding "" instead
    of null would check as well, so the checker takes only what the store writes (null)."""
    row = sqlite_store.rows[1]
    fields = (row["seq"], row["received_at"], row["source"], row["payload_sha256"], None)
    assert chain_hash("0" * 64, *fields, None) == chain_hash("0" * 64, *fields, "") == row["chain_hash"]
    proof = json.loads(proof_of(sqlite_store, 1))
    assert proof["row"]["quarantine_reason"] is None
    proof["row"]["quarantine_reason"] = ""
    fails(redump(proof), keys.public, "empty text")
    marker_link = json.loads(proof_of(sqlite_store, 2))["links"][0]  # row 3, a session marker
    assert marker_link[proofs.LINK_FIELDS.index("kind")] == "session"
    proof = json.loads(proof_of(sqlite_store, 2))
    proof["links"][0][proofs.LINK_FIELDS.index("session")] = ""
    fails(redump(proof), keys.public, "empty text")


def test_check_proof_cli_needs_a_real_public_key(sqlite_store, keys, tmp_path):
    path = tmp_path / "proof.json"
    run("prove", 6, "-o", path, "--db", sqlite_store.url)
    result = run("check-proof", path, "--public-key", keys.path, ok=False)  # the private key
    assert result.exit_code == 1 and "Error:" in result.output and "not a PEM public key" in result.output
    ssh_style = tmp_path / "rsa.pub"
    ssh_style.write_text("ssh-ed25519 AAAA...\n")
    assert run("check-proof", path, "--public-key", ssh_style, ok=False).exit_code == 1
    assert Path(path).read_bytes() == proof_of(sqlite_store, 6)
