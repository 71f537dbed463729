"""Redactions as verify, export/import, ingest and proofs see them (store/redaction_check.py), on
both engines.

A row redacted by ``forget`` (or at ingest) keeps its original payload_sha256 and chain_hash:
``verify`` accepts it, and counts it, only when its redaction check holds; an export carries the
records and an import into an empty store gives the same chain; a redaction at ingest never
writes the clear value; a proof of a redacted row checks, and says the original is not
recomputable.  Every other change of a payload is tampering, as before.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from helpers import (
    at,
    bayeux,
    data,
    envelope,
    feed,
    fresh_store,
    kind_of,
    log_rows,
    run,
    snapshot,
    started,
    table_rows,
    unguard_log,
)
from sqlalchemy import create_engine, select, text

from store import proofs, redaction, seals, verify
from store.db import open_store, text_sha256, write_transaction
from store.db import snapshot as db_snapshot
from store.export import export_lines
from store.ingest.files import import_stream
from store.log import payload_sha256
from store.notifications import CLAIM_REFUSED
from store.projections import runner
from store.redaction import INGEST_REASON
from store.schema import event_log, redactions

SECRET = "C5947"
CARD = "4111111111111111"
SESSION = "i1/agent-1/1"


def lines() -> list[str]:
    """W1 (customer SECRET) in three notifications and a snapshot, W2 of another customer."""
    user = {"Customer": SECRET, "Phone": "555-0100"}
    return [
        envelope(bayeux(data("StatusChange", "W1", state="Invited", user_data=user), mid="1"), "agent-1", at(0)),
        envelope(bayeux(data("StatusChange", "W2", state="Invited", user_data={"Customer": "C0001"}), mid="2"),
                 "agent-1", at(1)),
        envelope(bayeux(data("PropertiesUpdated", "W1", user_data={**user, "Case": "K-1"}), mid="3"),
                 "agent-1", at(2)),
        started("agent-1", SESSION, at(3)),
        snapshot("agent-1", SESSION, at(4), [{"id": "W1", "state": "Processing", "userData": user},
                                             {"id": "W2", "state": "Invited", "userData": {"Customer": "C0001"}}]),
        envelope(bayeux(data("StatusChange", "W1", state="Completed", user_data=user), mid="4"), "agent-1", at(5)),
        envelope(bayeux(data("StatusChange", "W2", state="Processing"), mid="5"), "agent-1", at(6)),
    ]


REDACTED_SEQS = [1, 3, 5, 6]  # the rows whose userData holds SECRET


@pytest.fixture
def store(engine):
    feed(engine, lines(), source="agent-1")
    runner.project(engine)
    return engine


def forget(engine, value: str = SECRET, keys=("Customer",)) -> redaction.ForgetResult:
    return redaction.forget(engine, redaction.Selection(user_data=("Customer", value)), "erasure request 117", keys)


def chain(engine) -> list[tuple]:
    with db_snapshot(engine) as conn:
        return [(r["seq"], r["payload_sha256"], r["chain_hash"]) for r in log_rows(conn)]


def verified(engine) -> verify.VerifyReport:
    with db_snapshot(engine) as conn:
        return verify.verify(conn)


def payload_of(engine, seq: int) -> str:
    with db_snapshot(engine) as conn:
        return conn.execute(select(event_log.c.payload).where(event_log.c.seq == seq)).scalar_one()


# -- verify ------------------------------------------------------------------------------------

def test_verify_accepts_recorded_redactions_and_counts_them(store):
    before = chain(store)
    assert verified(store).redacted == 0
    assert forget(store).redacted == len(REDACTED_SEQS)
    assert chain(store) == before  # payload_sha256 and chain_hash keep the original values
    report = verified(store)
    assert report.ok, (report.chain_break, report.column_mismatch, report.differences)
    assert report.chain_break is None and report.redacted == len(REDACTED_SEQS)
    assert report.head_hash == before[-1][2]
    for seq in REDACTED_SEQS:
        assert SECRET not in payload_of(store, seq) and redaction.MARKER in payload_of(store, seq)
    # Redacted again (other keys): one more record for the rows that change, still verified.
    assert redaction.forget(store, redaction.Selection(workitems=("W1",)), "case closed", ["Phone"]).redacted
    report = verified(store)
    assert report.ok and report.redacted == len(REDACTED_SEQS)


def test_the_exact_path_accepts_the_same_redactions(store, monkeypatch):
    """The row-by-row reference (a chunk the fast path leaves to it) agrees with the fast path."""
    forget(store)
    fast = verified(store)
    monkeypatch.setattr(verify, "_plain_times", lambda *_: None)
    exact = verified(store)
    assert (exact.ok, exact.redacted, exact.head_hash) == (fast.ok, fast.redacted, fast.head_hash) == (
        True, len(REDACTED_SEQS), chain(store)[-1][2])


def _record(conn, seq: int, payload: str, keys: list[str]) -> None:
    """A redactions row for ``payload`` (a forger's: the table takes INSERTs), naming every
    workitem of the row."""
    workitems = [wid for wid, _ in redaction.scoped_user_data(json.loads(payload), "notification")] or [""]
    redaction.record(conn, [{"seq": seq, "redacted_at": at(100), "reason": "forged", "keys": keys,
                             "workitems": workitems, "payload_sha256": text_sha256(payload),
                             "redacted_by": "mallory"}])


def _message(engine, seq: int) -> dict:
    return json.loads(payload_of(engine, seq))


def _canonical(message: dict) -> str:
    return redaction.serialise(message)


def _no_record_triggers_off(engine, conn, seq):
    message = _message(engine, seq)
    message["data"]["workitem"]["userData"]["Customer"] = redaction.MARKER
    unguard_log(conn)
    conn.execute(event_log.update().where(event_log.c.seq == seq).values(payload=_canonical(message)))


def _forged_other_value(engine, conn, seq):
    message = _message(engine, seq)
    message["data"]["workitem"]["userData"]["Customer"] = "C0002"  # not the marker
    _record(conn, seq, _canonical(message), ["Customer"])
    conn.execute(event_log.update().where(event_log.c.seq == seq).values(payload=_canonical(message)))


def _forged_workitem(engine, conn, seq):
    message = _message(engine, seq)
    message["data"]["workitem"]["userData"]["Customer"] = redaction.MARKER
    message["data"]["workitem"]["id"] = "W9"  # an extracted column (workitem_id) changes
    _record(conn, seq, _canonical(message), ["Customer"])
    conn.execute(event_log.update().where(event_log.c.seq == seq).values(payload=_canonical(message)))


def _forged_spelling(engine, conn, seq):
    """The same JSON spelt otherwise (room to hide bytes in): not the form a redaction writes."""
    message = _message(engine, seq)
    message["data"]["workitem"]["userData"]["Customer"] = redaction.MARKER
    payload = _canonical(message).replace('"Invited"', '"Invited" ')  # another spelling of the same JSON
    _record(conn, seq, payload, ["Customer"])
    conn.execute(event_log.update().where(event_log.c.seq == seq).values(payload=payload))


def _forged_duplicate_key(engine, conn, seq):
    """The clear value kept in a first "userData" that a parser overrides with the second."""
    payload = payload_of(engine, seq)
    clear = json.dumps(json.loads(payload)["data"]["workitem"]["userData"], separators=(",", ":"))
    message = _message(engine, seq)
    message["data"]["workitem"]["userData"]["Customer"] = redaction.MARKER
    hidden = _canonical(message).replace('"userData":', f'"userData":{clear},"userData":', 1)
    _record(conn, seq, hidden, ["Customer"])
    conn.execute(event_log.update().where(event_log.c.seq == seq).values(payload=hidden))


def _changed_after_forget(engine, conn, seq):
    message = _message(engine, seq)
    message["data"]["workitem"]["state"] = "Completed"
    unguard_log(conn)
    conn.execute(event_log.update().where(event_log.c.seq == seq).values(payload=_canonical(message)))


def _newest_record_not_matching(engine, conn, seq):
    message = _message(engine, seq)
    message["data"]["workitem"]["userData"]["Phone"] = redaction.MARKER
    _record(conn, seq, _canonical(message), ["Phone"])  # newest: a payload that was never written


@pytest.mark.parametrize("tamper, forgotten_first", [
    (_no_record_triggers_off, False), (_forged_other_value, False), (_forged_workitem, False),
    (_forged_spelling, False), (_forged_duplicate_key, False), (_changed_after_forget, True),
    (_newest_record_not_matching, True)])
def test_any_other_change_of_a_payload_is_tampering(store, tamper, forgotten_first):
    if forgotten_first:
        forget(store)
    seq = 1
    with write_transaction(store) as conn:
        tamper(store, conn, seq)
    report = verified(store)
    assert not report.ok
    assert report.chain_break is not None
    assert (report.chain_break.seq, report.chain_break.what) == (seq, "payload_sha256")
    assert report.chain_break.found == chain(store)[seq - 1][1]  # the original's hash, stored
    out = run("verify", "--db", str(store.url.render_as_string(hide_password=False)), ok=False).output
    assert f"chain BROKEN at seq {seq}: payload_sha256 expected" in out


def test_direct_updates_without_a_record_are_refused(store):
    """(The triggers are engineer A's; verify relies on them refusing what the check would not see.)"""
    message = _message(store, 1)
    message["data"]["workitem"]["userData"]["Customer"] = redaction.MARKER
    with pytest.raises(Exception, match="append-only"), write_transaction(store) as conn:
        conn.execute(event_log.update().where(event_log.c.seq == 1).values(payload=_canonical(message)))


# -- export and import ---------------------------------------------------------------------------

def _export(engine) -> list[str]:
    with db_snapshot(engine) as conn:
        return list(export_lines(conn))


def _records(engine) -> list[dict]:
    with db_snapshot(engine) as conn:
        return [{k: v for k, v in row.items() if k != "id"} for row in table_rows(conn, redactions)]


def test_export_of_a_redacted_store_imports_into_an_empty_one_with_the_same_chain(store, engine_kind):
    forget(store)
    exported = _export(store)
    assert not any(SECRET in line for line in exported)
    claims = [json.loads(line) for line in exported if '"redactions"' in line]
    assert len(claims) == len(REDACTED_SEQS)
    assert all(c["redactions"][0]["reason"] == "erasure request 117" and c["redactions"][0]["keys"] == ["Customer"]
               for c in claims)
    with fresh_store(engine_kind) as other:
        result = feed(other, exported, source="restore")
        assert result.quarantined == 0
        runner.project(other)
        assert chain(other) == chain(store)
        assert _records(other) == _records(store)
        report = verified(other)
        assert report.ok and report.redacted == len(REDACTED_SEQS)
        assert _export(other) == exported  # and exported again, the same lines


def test_the_cli_export_holds_no_redacted_value_and_import_verifies(store, engine_kind, tmp_path):
    forget(store)
    url = store.url.render_as_string(hide_password=False)
    out = tmp_path / "backup.jsonl"
    run("export", "-o", out, "--db", url)
    assert SECRET not in out.read_text()
    with fresh_store(engine_kind) as other:
        other_url = other.url.render_as_string(hide_password=False)
        run("import", out, "--db", other_url)
        run("verify", "--db", other_url)
        assert chain(other) == chain(store)


def _claim_line(line: str, claim=None, payload=None) -> str:
    """An exported claim line with its claim changed by ``claim(head)`` and its message text by
    ``payload(text)``, the rest byte for byte."""
    at_message = line.index(', "message": ')
    head, message = json.loads(line[:at_message] + "}"), line[at_message + len(', "message": '):-1]
    if claim:
        claim(head)
    return json.dumps(head)[:-1] + ', "message": ' + (payload(message) if payload else message) + "}"


def test_an_import_claim_that_does_not_hold_is_an_ordinary_quarantined_row(store, engine_kind):
    forget(store)
    exported = _export(store)
    seq = REDACTED_SEQS[0]
    # A change the records do not explain (Phone was not redacted), the message otherwise as written.
    changed = _claim_line(exported[seq - 1], payload=lambda m: m.replace('"555-0100"', '"555-0199"'))
    assert changed != exported[seq - 1]
    assert _claim_line(exported[seq - 1]) == exported[seq - 1]
    with fresh_store(engine_kind) as other:
        result = feed(other, [*exported[:seq - 1], changed, *exported[seq:]], source="restore")
        assert result.quarantined == 1 and list(result.reasons) == [CLAIM_REFUSED]
        runner.project(other)
        with db_snapshot(other) as conn:
            row = conn.execute(select(event_log).where(event_log.c.seq == seq)).one()
            assert row.quarantine_reason.startswith(CLAIM_REFUSED)
            assert row.payload_sha256 == payload_sha256(row.payload)  # its own hash
            assert not conn.execute(select(redactions).where(redactions.c.seq == seq)).first()
        report = verified(other)
        assert report.chain_break is None and report.column_mismatch is None
        assert report.redacted == len(REDACTED_SEQS) - 1


def _set_record_hash(head):
    head["redactions"][-1]["payload_sha256"] = "0" * 64


def _set_original(head):
    head["payload_sha256"] = "not hex"


def _no_records(head):
    head["redactions"] = []


def _no_keys(head):
    head["redactions"][-1]["keys"] = []


def _unknown_key(head):
    head["redactions"][-1]["keys"] = ["Customer", "Nobody"]


@pytest.mark.parametrize("claim", [_set_record_hash, _set_original, _no_records, _no_keys, _unknown_key])
def test_malformed_claims_are_refused(store, engine_kind, claim):
    forget(store)
    exported = _export(store)
    seq = REDACTED_SEQS[1]
    with fresh_store(engine_kind) as other:
        result = feed(other, [*exported[:seq - 1], _claim_line(exported[seq - 1], claim)], source="restore")
        assert list(result.reasons) == [CLAIM_REFUSED]
        assert verified(other).column_mismatch is None


# -- redaction at ingest ---------------------------------------------------------------------------

def card_lines() -> list[str]:
    user = {"CardNumber": CARD, "Customer": "C0042"}
    return [
        envelope(bayeux(data("StatusChange", "W1", state="Invited", user_data=user), mid="1"), "agent-1", at(0)),
        bayeux(data("StatusChange", "W2", state="Invited", user_data={"CardNumber": CARD + "9"}), mid="2"),
        envelope(bayeux(data("StatusChange", "W3", state="Invited"), mid="3"), "agent-1", at(2)),  # no userData
        started("agent-1", SESSION, at(3)),
        snapshot("agent-1", SESSION, at(4), [{"id": "W1", "state": "Invited", "userData": user}]),
    ]


def _everything_as_text(engine) -> str:
    """Every row of every table and view of the store, as text."""
    with db_snapshot(engine) as conn:
        if conn.dialect.name == "sqlite":
            names = conn.execute(text("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")).scalars()
        else:
            names = conn.execute(text("SELECT table_name FROM information_schema.tables "
                                      "WHERE table_schema = current_schema()")).scalars()
        return "\n".join(str(list(conn.execute(text(f'SELECT * FROM "{name}"')))) for name in list(names))


def test_redaction_at_ingest_never_writes_the_clear_value(db_url, tmp_path):
    source = tmp_path / "cards.jsonl"
    source.write_text("\n".join(card_lines()) + "\n")
    run("import", source, "--redact-keys", "CardNumber, CVV", "--db", db_url)
    engine = open_store(db_url)
    try:
        if kind_of(db_url) == "sqlite":
            files = [Path(engine.url.database + suffix) for suffix in ("", "-wal", "-journal", "-shm")]
            assert not any(CARD.encode() in f.read_bytes() for f in files if f.exists())
        assert CARD not in _everything_as_text(engine)
        with db_snapshot(engine) as conn:
            rows = {r["seq"]: r for r in log_rows(conn)}
            records = table_rows(conn, redactions)
        assert [r["seq"] for r in records] == [1, 2, 5]
        assert all(r["reason"] == INGEST_REASON and json.loads(r["keys"]) == ["CardNumber"] for r in records)
        original = card_lines()[0]
        assert rows[1]["payload_sha256"] == payload_sha256(json.dumps(json.loads(original)["message"]))
        assert rows[3]["payload_sha256"] == payload_sha256(rows[3]["payload"])  # nothing to redact: as ever
        assert '"Customer":"C0042"' in rows[1]["payload"]  # other keys as they were
        report = verified(engine)
        assert report.ok and report.redacted == 3
        # The same lines again: duplicates of the first rows, as without redaction.
        result = import_stream(engine, io.BytesIO(source.read_bytes()), file_name="again", source="f",
                               redact_keys={"CardNumber"})
        assert result.duplicates == 2
        runner.project(engine)
        report = verified(engine)
        assert report.ok and report.redacted == 6
    finally:
        engine.dispose()


def test_redact_keys_from_the_environment(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    source = tmp_path / "cards.jsonl"
    source.write_text("\n".join(card_lines()) + "\n")
    run("import", source, "--db", db_url, env={"WORKITEM_STORE_REDACT_KEYS": "CardNumber"})
    engine = open_store(db_url)
    try:
        assert CARD not in _everything_as_text(engine)
        assert verified(engine).redacted == 3
    finally:
        engine.dispose()


def test_redact_keys_of_the_ingest_config(tmp_path):
    from store.db import StoreError
    from store.ingest import config

    path = tmp_path / "agents.toml"
    path.write_text('gws_url = "http://127.0.0.1:1"\nredact_keys = ["CardNumber", "CVV"]\n'
                    '[[sessions]]\nuser = "a"\npassword = "p"\n')
    assert config.load_redact_keys(path) == {"CardNumber", "CVV"}
    assert config.load_redact_keys(path, "Iban") == {"Iban"}  # the option (or variable) wins
    assert len(config.load_config(path)) == 1
    path.write_text('gws_url = "http://127.0.0.1:1"\n[[sessions]]\nuser = "a"\npassword = "p"\n'
                    'redact_keys = ["CardNumber"]\n')
    with pytest.raises(StoreError, match="whole store"):
        config.load_config(path)
    path.write_text('redact_keys = "CardNumber"\n[[sessions]]\nuser = "a"\npassword = "p"\n')
    with pytest.raises(StoreError, match="redact_keys must be a list"):
        config.load_redact_keys(path)
    with pytest.raises(StoreError, match="empty key"):
        config.redact_keys("a,,b")


# -- proofs ------------------------------------------------------------------------------------

@pytest.fixture
def keys(tmp_path):
    private_path, public_path = seals.keygen(tmp_path / "seal.key")
    return seals.load_private_key(private_path), seals.load_public_key(public_path), public_path


def _proof(engine, seq: int) -> bytes:
    with db_snapshot(engine) as conn:
        return proofs.dumps(proofs.prove(conn, seq)).encode()


def test_a_proof_of_a_redacted_row_checks_and_says_so(store, keys, tmp_path):
    private, public, public_path = keys
    seals.seal(store, private)
    forget(store)
    seq = REDACTED_SEQS[1]
    proof = _proof(store, seq)
    assert SECRET not in proof.decode()
    result = proofs.check(proof, public)
    assert result.ok and "payload redacted (original not recomputable)" in result.message
    assert proofs.check(_proof(store, 2), public).message.startswith("row 2 is in store")  # not redacted: as ever
    path = tmp_path / "proof.json"
    path.write_bytes(proof)
    assert "payload redacted (original not recomputable)" in run("check-proof", path, "--public-key",
                                                                 public_path).output
    # A changed byte of the payload, of a record's hash or keys, or a record removed: fails.
    parsed = json.loads(proof)
    for change in ("payload", "record_hash", "keys", "no_records", "no_redactions"):
        changed = json.loads(proof)
        if change == "payload":
            changed["row"]["payload"] = parsed["row"]["payload"].replace('"W1"', '"W7"')
        elif change == "record_hash":
            changed["redactions"][0]["payload_sha256"] = hashlib.sha256(b"x").hexdigest()
        elif change == "keys":
            changed["redactions"][0]["keys"] = ["Customer", "Phone"]
        elif change == "no_records":
            changed["redactions"] = []
        else:
            del changed["redactions"]
        failed = proofs.check(proofs.dumps(changed).encode(), public)
        assert not failed.ok and "payload" in failed.message, change
    flipped = proof.replace(redaction.MARKER.encode(), b"[REDACTEX]", 1)
    assert not proofs.check(flipped, public).ok


def test_sealed_heads_still_hold_after_forget(store, keys):
    private, public, _ = keys
    seals.seal(store, private)
    forget(store)
    with db_snapshot(store) as conn:
        report = verify.verify(conn, public_key=public)
    assert report.ok and not report.seals.problems and report.redacted == len(REDACTED_SEQS)


def test_verify_needs_no_function_of_the_store(store):
    """The redaction check runs in Python: an engine of another client (without the SQLite
    function wis_sha256 the store registers) verifies the same."""
    forget(store)
    other = create_engine(store.url)
    try:
        with other.connect() as conn:
            report = verify.VerifyReport()
            verify.verify_chain(conn, report)
        assert report.chain_break is None and report.redacted == len(REDACTED_SEQS)
    finally:
        other.dispose()


def test_a_forged_record_with_a_change_outside_userdata_shows_in_the_projections(store):
    """The limit of the check, stated: with a forged record (the table takes INSERTs), a change
    of a field that is neither userData nor an extracted column (here the state) cannot be told
    from a redaction by the payload alone (the original is gone); the chain holds, but verify
    still fails, because the projections no longer equal a rebuild from the log."""
    seq = 1
    message = _message(store, seq)
    message["data"]["workitem"]["userData"]["Customer"] = redaction.MARKER
    message["data"]["workitem"]["state"] = "Completed"
    with write_transaction(store) as conn:
        _record(conn, seq, _canonical(message), ["Customer"])
        conn.execute(event_log.update().where(event_log.c.seq == seq).values(payload=_canonical(message)))
    report = verified(store)
    assert report.chain_break is None and report.redacted == 1
    assert not report.ok and "workitem_transitions" in report.differences


def test_live_ingest_redacts_the_configured_keys_before_writing(cometd, db_url):
    """``ingest --redact-keys`` (Ingestor redact_keys): the snapshot and the notifications reach
    the log with the marker in place of the value, recorded; verify counts them."""
    import asyncio
    import uuid

    import aiohttp
    from cometd_server import Control, eventually, notification

    from store.ingest.config import SessionConfig
    from store.ingest.service import Ingestor

    user = f"redact-{uuid.uuid4().hex[:6]}"
    live_secret = "IBAN-DE-0000-LIVE"

    def rows(engine) -> list[dict]:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(event_log).order_by(event_log.c.seq))]

    async def main() -> list:
        engine = open_store(db_url)
        ingestor = Ingestor(engine, [SessionConfig(cometd.base, user, "pw")], redact_keys={"Iban", "Subject"},
                            backoff_base=0.02, backoff_cap=0.2)
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            await control.set_workitems(user, [{"id": "open-1", "state": "Processing",
                                                "userData": {"Iban": live_secret, "Team": "B"}}])
            task = asyncio.create_task(ingestor.run())

            async def subscribed():
                return (await control.users()).get(user, {}).get("subscribed")
            await eventually(subscribed, "the session to subscribe")
            # The snapshot first: read after the publish below, it would list that workitem too.
            await eventually(lambda: any(r["kind"] == "snapshot" for r in rows(engine)), "the snapshot")
            message = notification(1)
            message["workitem"]["userData"]["Iban"] = live_secret
            await control.publish([message], user=user)
            await eventually(lambda: any(r["kind"] == "notification" for r in rows(engine)), "the notification")
            ingestor.stop()
            errors = await task
        engine.dispose()
        return errors

    assert asyncio.run(asyncio.wait_for(main(), 120)) == []
    engine = open_store(db_url)
    try:
        assert live_secret not in _everything_as_text(engine)
        if kind_of(db_url) == "sqlite":
            files = [Path(engine.url.database + suffix) for suffix in ("", "-wal")]
            files += [f for f in Path(engine.url.database + ".spool").rglob("*") if f.is_file()]  # (nothing spooled)
            assert not any(live_secret.encode() in f.read_bytes() for f in files if f.exists())
        with db_snapshot(engine) as conn:
            records = table_rows(conn, redactions)
            kinds = {r["seq"]: r["kind"] for r in log_rows(conn)}
        assert sorted(kinds[r["seq"]] for r in records) == ["notification", "snapshot"]
        assert {r["keys"] for r in records} == {'["Iban"]', '["Iban","Subject"]'}
        report = verified(engine)
        assert report.ok and report.redacted == 2
    finally:
        engine.dispose()
