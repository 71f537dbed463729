"""Audit investigations of one workitem, on both engines, over a hand-made trail (audit_trail.py).

* ``history WORKITEM_ID``: the full trail of one workitem from the log (JSON, CSV, table);
* ``state WORKITEM_ID --as-of T | --seq N``: its state at that point, and the options' errors;
* ``status`` shows the same chain head that ``verify`` reaches.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re

import pytest
from audit_trail import TRAIL_LINES, W1_CHANGES, W1_SEQS, env, t
from helpers import at, bayeux, data, envelope, feed, load_store, run
from sqlalchemy import text

from store import audit, db
from store.projections import runner
from store.schema import workitems

WORKITEM_COLUMNS = [c.name for c in workitems.columns]
ENTRY_KEYS = ["seq", "received_at", "source", "notification_type", "reference_id", "status", "state_from",
              "state_to", "capabilities_granted", "capabilities_revoked", "user_data_changes",
              "request_outcome", "error_code", "error_message"]


def expected_entry(seq: int) -> dict:
    entry = {"seq": seq, "received_at": t(seq - 1), "source": "agent-1", "notification_type": None,
             "reference_id": None, "status": "projected", "state_from": None, "state_to": None,
             "capabilities_granted": [], "capabilities_revoked": [], "user_data_changes": None,
             "request_outcome": None, "error_code": None, "error_message": None}
    entry.update(W1_CHANGES[seq])
    return entry


@pytest.fixture
def trail_url(db_url):
    """A store holding TRAIL_LINES in its log only (history and state read the log alone)."""
    load_store(db_url, TRAIL_LINES, project=False)
    return db_url


def test_history_json_is_every_row_about_the_workitem(trail_url):
    entries = json.loads(run("history", "W1", "--json", "--db", trail_url).stdout)
    assert [e["seq"] for e in entries] == W1_SEQS
    for e in entries:
        assert list(e) == ENTRY_KEYS
        expected = expected_entry(e["seq"])
        assert dt.datetime.fromisoformat(e["received_at"]) == expected.pop("received_at")
        if e["seq"] == 8:
            assert e["status"].startswith("quarantined: ") and "Deleted" in e["status"], e
            e["status"] = expected["status"]
        assert {k: v for k, v in e.items() if k != "received_at"} == expected


def test_history_csv_has_a_header_and_one_row_per_log_row(trail_url):
    out = run("history", "W1", "--csv", "--db", trail_url).stdout
    reader = csv.DictReader(io.StringIO(out))
    assert reader.fieldnames == ENTRY_KEYS
    rows = list(reader)
    assert [int(r["seq"]) for r in rows] == W1_SEQS
    by_seq = {int(r["seq"]): r for r in rows}
    assert by_seq[3]["status"] == "duplicate of seq 1"
    assert json.loads(by_seq[4]["capabilities_granted"]) == ["Transfer", "Complete"]
    assert json.loads(by_seq[4]["capabilities_revoked"]) == ["Accept", "Reject"]
    assert json.loads(by_seq[10]["user_data_changes"]) == W1_CHANGES[10]["user_data_changes"]
    assert (by_seq[6]["reference_id"], by_seq[6]["request_outcome"], by_seq[6]["error_code"]) == ("4", "failed", "500")
    assert by_seq[1]["error_code"] == "" and by_seq[1]["state_from"] == ""  # None is an empty field
    assert dt.datetime.fromisoformat(by_seq[11]["received_at"]) == t(10)


def test_history_table_lists_the_seqs(trail_url):
    out = run("history", "W1", "--db", trail_url).stdout
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["seq", "received_at", "source"]
    assert [int(line.split()[0]) for line in lines[2:]] == W1_SEQS
    for fragment in ("Invited -> Processing", "- -> Invited", "duplicate of seq 1", "4 failed", "500 timeout",
                     "409 locked", "Transfer,Complete", f"{t(3):%Y-%m-%dT%H:%M:%S.%fZ}"):
        assert fragment in out, fragment


def test_history_of_an_unknown_workitem_fails_clearly(trail_url):
    result = run("history", "NOPE", "--db", trail_url, ok=False)
    assert result.exit_code == 1
    assert "no log row mentions workitem 'NOPE'" in result.output
    assert "Traceback" not in result.output


def test_history_request_outcome_is_the_request_outcomes_row(engine):
    feed(engine, [
        envelope(bayeux(data("StatusChange", "W1", state="Invited", ref=1), "1"), "agent-1", at(0)),
        envelope(bayeux(data("Error", "W2", ref=1, code=500), "2"), "agent-1", at(1)),
    ])
    runner.project(engine)
    with db.snapshot(engine) as conn:
        (outcome,) = conn.execute(text("SELECT workitem_id, outcome FROM request_outcomes")).all()
        assert tuple(outcome) == ("W1", "failed")
        (entry,) = audit.history(conn, "W1")
    assert entry["request_outcome"] == "failed"


# -- state: the command ------------------------------------------------------------------------

def test_state_at_a_seq_or_an_instant(trail_url):
    (found,) = json.loads(run("state", "W1", "--seq", 4, "--json", "--db", trail_url).stdout)
    assert {k: found[k] for k in ("workitem_id", "state", "capabilities", "user_data", "first_seq", "last_seq",
                                  "notification_count", "error_count")} == {
        "workitem_id": "W1", "state": "Processing", "capabilities": ["Transfer", "Complete"],
        "user_data": {"Subject": "Refund"}, "first_seq": 1, "last_seq": 4, "notification_count": 2,
        "error_count": 0}
    assert found["open_capabilities_since_seq"] == {"Transfer": 4, "Complete": 4}
    assert set(found) == set(WORKITEM_COLUMNS) | {"last_applied_seq", "open_capabilities_since_seq"}

    def state_as_of(stamp: str) -> dict:
        (row,) = json.loads(run("state", "W1", "--as-of", stamp, "--json", "--db", trail_url).stdout)
        return row

    just_before_4 = t(3) - dt.timedelta(microseconds=1)
    assert state_as_of(just_before_4.isoformat())["state"] == "Invited"
    assert state_as_of(t(3).isoformat())["state"] == "Processing"  # received at that instant: included
    # The same instant in another offset, and without offset (UTC).
    assert state_as_of((t(3) - dt.timedelta(microseconds=1)).astimezone(dt.timezone(dt.timedelta(hours=1)))
                       .isoformat())["state"] == "Invited"
    assert state_as_of(t(3).replace(tzinfo=None).isoformat())["state"] == "Processing"
    late = state_as_of(t(20).isoformat())
    assert (late["state"], late["capabilities"], late["error_count"]) == ("Completed", [], 1)
    assert late == json.loads(run("state", "W1", "--seq", 12, "--json", "--db", trail_url).stdout)[0]

    csv_rows = list(csv.DictReader(io.StringIO(run("state", "W1", "--seq", 4, "--csv", "--db", trail_url).stdout)))
    assert len(csv_rows) == 1 and csv_rows[0]["state"] == "Processing"
    assert json.loads(csv_rows[0]["open_capabilities_since_seq"]) == {"Transfer": 4, "Complete": 4}
    table = run("state", "W1", "--seq", 4, "--db", trail_url).stdout
    assert re.search(r"^state\s+Processing\s*$", table, re.M), table


def test_state_needs_exactly_one_of_as_of_and_seq(trail_url):
    for args in ([], ["--seq", 3, "--as-of", "2026-11-02T08:00:00Z"]):
        result = run("state", "W1", *args, "--db", trail_url, ok=False)
        assert result.exit_code == 2 and "exactly one of --as-of TIMESTAMP or --seq N" in result.output
    result = run("state", "W1", "--as-of", "yesterday", "--db", trail_url, ok=False)
    assert result.exit_code == 2 and "--as-of" in result.output
    result = run("state", "W1", "--seq", 0, "--db", trail_url, ok=False)
    assert result.exit_code == 1 and "'W1' was not known at seq 0" in result.output
    result = run("state", "W1", "--as-of", t(0).replace(year=2025).isoformat(), "--db", trail_url, ok=False)
    assert result.exit_code == 1 and "was not known as of 2025-11-02" in result.output
    result = run("state", "NOPE", "--seq", 100, "--db", trail_url, ok=False)
    assert result.exit_code == 1 and "'NOPE' was not known" in result.output



# -- status and verify agree on the chain head ----------------------------------------------------

def test_status_chain_head_is_the_head_verify_reaches(db_url):
    load_store(db_url, TRAIL_LINES)

    def heads():
        status = json.loads(run("status", "--json", "--db", db_url).stdout)["event_log"]
        report = json.loads(run("verify", "--json", "--db", db_url).stdout)
        assert report["ok"] is True and report["chain_break"] is None
        assert (status["head_seq"], status["chain_head"]) == (report["head_seq"], report["chain_head"])
        assert re.fullmatch(r"[0-9a-f]{64}", status["chain_head"])
        text_out = run("status", "--db", db_url).output
        assert f"chain head: seq {status['head_seq']} {status['chain_head']}" in text_out
        return status["head_seq"], status["chain_head"]

    seq, head = heads()
    assert seq == len(TRAIL_LINES)
    load_store(db_url, [env(bayeux(data("StatusChange", "W3", state="Invited"), "m10"), 12)])
    new_seq, new_head = heads()
    assert new_seq == seq + 1 and new_head != head
