"""The ``workitem-store`` command line, on both engines."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import sqlite3
import sys
from pathlib import Path

import pytest
from helpers import (
    at,
    bare,
    bayeux,
    data,
    envelope,
    fresh_url,
    log_rows,
    projection_snapshot,
    run,
    table_rows,
    tamper_log,
)
from sqlalchemy import func, select, text

from store.cli.formatting import emit_rows
from store.cli.ingest_cmds import invocation
from store.db import head_revision, open_store
from store.projections import PROJECTIONS
from store.schema import PROJECTION_TABLES, event_log, imported_files, workitems

ISO_Z = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"  # the one timestamp form of all output


def write(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


LINES = [
    bayeux(data("StatusChange", "W1", state="Invited", caps=["Accept"], ref=1), mid="1"),
    bayeux(data("StatusChange", "W1", state="Processing", caps=["Complete"], ref=2), mid="2"),
    bayeux(data("StatusChange", "W1", state="Invited", caps=["Accept"], ref=1), mid="1"),  # duplicate
    "garbage",  # quarantined
    bare(data("Deleted", "W1")),  # quarantined
    bare(data("Error", "W2", ref=3, code=500, message="timeout")),
]


def count(url: str, table=event_log) -> int:
    engine = open_store(url)
    with engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(table)).scalar_one()
    engine.dispose()
    return n


def test_import_reports_counts_and_exits_0_with_quarantined_lines(db_url, tmp_path):
    path = write(tmp_path / "capture.jsonl", LINES)
    result = run("import", path, "--db", db_url)
    assert "capture.jsonl: 6 appended (seq 1-6), 1 duplicate, 2 quarantined" in result.output
    assert "projections up to date at seq 6" in result.output
    engine = open_store(db_url)
    with engine.connect() as conn:
        rows = log_rows(conn)
        assert {r["source"] for r in rows} == {"file:capture.jsonl"}
        assert [w["state"] for w in table_rows(conn, workitems)] == ["Processing", None]
    engine.dispose()


def test_importing_the_same_file_again_is_refused_unless_again(db_url, tmp_path):
    path = write(tmp_path / "capture.jsonl", LINES)
    run("import", path, "--db", db_url)
    copy = write(tmp_path / "renamed.jsonl", LINES)  # same content under another name
    for target in (path, copy):
        result = run("import", target, "--db", db_url, ok=False)
        assert result.exit_code != 0
        assert "already imported" in result.output and "--again" in result.output
    assert count(db_url) == 6 and count(db_url, imported_files) == 1
    result = run("import", "--again", path, "--db", db_url)
    assert "6 appended (seq 7-12), 3 duplicate, 2 quarantined" in result.output  # ids 1, 2, 1: same source
    assert count(db_url) == 12 and count(db_url, imported_files) == 2


def test_import_of_missing_or_unreadable_input_fails(db_url, tmp_path):
    for bad in (tmp_path / "missing.jsonl", tmp_path):
        result = run("import", bad, "--db", db_url, ok=False)
        assert result.exit_code != 0 and str(bad) in result.output
    if sys.platform.startswith("linux"):
        # A regular file whose reading fails (EIO), whoever runs the test (root reads chmod 000 files).
        result = run("import", "/proc/self/mem", "--db", db_url, ok=False)
        assert result.exit_code != 0 and "cannot read" in result.output
    assert count(db_url) == 0


def test_import_from_stdin(db_url):
    result = run("import", "-", "--db", db_url, input="\n".join(LINES[:2]) + "\n")
    assert "stdin: 2 appended" in result.output
    run("import", "-", "--source", "agent-9", "--db", db_url, input=LINES[5] + "\n")
    engine = open_store(db_url)
    with engine.connect() as conn:
        assert [r["source"] for r in log_rows(conn)] == ["stdin", "stdin", "agent-9"]
        assert [f["file_name"] for f in table_rows(conn, imported_files)] == ["stdin", "stdin"]
    engine.dispose()


def test_import_json_summary(db_url, tmp_path):
    result = run("import", "--json", write(tmp_path / "a.jsonl", LINES), "--db", db_url)
    summary = json.loads(result.output)
    (imp,) = summary["imports"]
    counts = (imp["appended"], imp["duplicates"], imp["quarantined"], imp["first_seq"], imp["last_seq"])
    assert counts == (6, 1, 2, 1, 6)
    assert summary["projected"]["to_seq"] == 6


def test_no_project_then_project_then_rebuild(db_url, tmp_path):
    run("import", "--no-project", write(tmp_path / "a.jsonl", LINES), "--db", db_url)
    status = json.loads(run("status", "--json", "--db", db_url).output)
    assert status["tables"]["workitems"] == 0
    assert {c["lag"] for c in status["checkpoints"]} == {6}
    result = run("project", "--db", db_url)
    assert re.search(r"applied 3 events, seq 0 -> 6", result.output), result.output
    assert "applied 0 events, seq 6 -> 6" in run("project", "--db", db_url).output
    engine = open_store(db_url)
    with engine.connect() as conn:
        projected = projection_snapshot(conn)
    assert len(projected["workitems"]) == 2
    result = run("rebuild", "--db", db_url)
    assert "rebuilt" in result.output and "log head seq 6" in result.output
    with engine.connect() as conn:
        assert projection_snapshot(conn) == projected
    engine.dispose()


def test_status_json(db_url, tmp_path):
    run("import", write(tmp_path / "a.jsonl", LINES), "--db", db_url)
    run("import", "--no-project", "-", "--db", db_url, input=LINES[5] + "\n")
    status = json.loads(run("status", "--json", "--db", db_url).output)
    e = status["event_log"]
    assert (e["rows"], e["duplicates"], e["quarantined"], e["head_seq"]) == (7, 1, 2, 7)
    engine = open_store(db_url)
    with engine.connect() as conn:
        head_hash = conn.execute(select(event_log.c.chain_hash).where(event_log.c.seq == 7)).scalar_one()
    engine.dispose()
    assert e["chain_head"] == head_hash
    assert sum(e["quarantine_reasons"].values()) == 2
    assert status["tables"] == {"event_log": 7, "imported_files": 2, "workitems": 2, "workitem_transitions": 2,
                                "capability_history": 2, "request_outcomes": 3, "projection_errors": 0}
    assert {c["projection"]: (c["last_seq"], c["lag"], c["version"]) for c in status["checkpoints"]} == {
        cls.name: (6, 1, cls.version) for cls in PROJECTIONS}
    text_out = run("status", "--db", db_url).output
    assert "event_log: 7 rows, 1 duplicate, 2 quarantined" in text_out and head_hash in text_out


# -- verify ----------------------------------------------------------------------------------------

@pytest.fixture
def imported(db_url, tmp_path):
    run("import", write(tmp_path / "a.jsonl", LINES), "--db", db_url)
    result = run("verify", "--db", db_url)
    assert "chain ok: 6 rows, head seq 6" in result.output
    assert "projections ok" in result.output
    return db_url


def test_verify_detects_an_altered_payload(imported):
    tamper_log(imported, "UPDATE event_log SET payload = replace(payload, 'Processing', 'Completed') WHERE seq = 2")
    result = run("verify", "--db", imported, ok=False)
    assert result.exit_code == 1
    assert "chain BROKEN at seq 2: payload_sha256" in result.output


def test_verify_detects_a_rewritten_row_with_a_matching_payload_hash(imported):
    forged = LINES[1].replace("Processing", "Completed")
    digest = hashlib.sha256(forged.encode()).hexdigest()
    tamper_log(imported, f"UPDATE event_log SET payload = '{forged}', payload_sha256 = '{digest}' WHERE seq = 2")
    report = json.loads(run("verify", "--json", "--db", imported, ok=False).output)
    assert report["ok"] is False
    assert (report["chain_break"]["seq"], report["chain_break"]["what"]) == (2, "chain_hash")


def test_verify_detects_an_extracted_column_that_disagrees_with_its_payload(imported):
    # The chain covers the payload, not the columns read out of it: verify re-reads them.
    tamper_log(imported, "UPDATE event_log SET workitem_id = 'forged' WHERE seq = 2")
    report = json.loads(run("verify", "--json", "--db", imported, ok=False).output)
    assert report["chain_break"] is None
    assert report["column_mismatch"]["seq"] == 2 and report["column_mismatch"]["what"] == "workitem_id"
    assert report["column_mismatch"]["found"] == "forged"


def test_a_row_no_projection_can_read_is_skipped_and_recorded_not_fatal(imported, tmp_path):
    # A payload replaced behind the store's back by text that is no message: projecting must
    # go on (the row is recorded in projection_errors), and verify still reports the tampering.
    tamper_log(imported, "UPDATE event_log SET payload = 'not a message' WHERE seq = 2")
    run("rebuild", "--db", imported)
    status = json.loads(run("status", "--json", "--db", imported).output)
    assert status["tables"]["projection_errors"] == len(PROJECTIONS)
    assert {(e["projection"], e["seq"]) for e in status["projection_errors"]} == {(p.name, 2) for p in PROJECTIONS}
    assert all(c["lag"] == 0 for c in status["checkpoints"])
    assert "projection errors: 4 log rows skipped" in run("status", "--db", imported).output
    run("import", write(tmp_path / "more.jsonl", [bare(data(wid="w9", state="Processing"))]), "--db", imported)
    report = json.loads(run("verify", "--json", "--db", imported, ok=False).output)
    assert report["chain_break"]["seq"] == 2 and report["lagging"] == {}


def test_verify_fails_on_projections_that_lag_the_log(imported, tmp_path):
    run("import", "--no-project", write(tmp_path / "b.jsonl", [bare(data(wid="w9", state="Processing"))]),
        "--db", imported)
    result = run("verify", "--db", imported, ok=False)
    assert "workitems LAGS the log: checkpoint seq 6, log head seq 7" in result.output
    run("project", "--db", imported)
    run("verify", "--db", imported)


def test_verify_detects_a_deleted_row(imported):
    tamper_log(imported, "DELETE FROM event_log WHERE seq = 3")
    result = run("verify", "--db", imported, ok=False)
    assert "chain BROKEN at seq 3: seq" in result.output


def test_verify_detects_an_altered_projection(imported):
    engine = open_store(imported)
    with engine.begin() as conn:
        conn.execute(text("UPDATE workitems SET state = 'Completed' WHERE workitem_id = 'W1'"))
    engine.dispose()
    result = run("verify", "--db", imported, ok=False)
    assert result.exit_code == 1
    assert "chain ok" in result.output and "workitems DIFFERS" in result.output
    # The changed row by its key, only the column that differs: the table's value, then the log's.
    assert "\n  workitem_id=W1: store has: state=Completed / log says: state=Processing\n" in result.output
    run("rebuild", "--db", imported)
    run("verify", "--db", imported)


def test_verify_shows_a_missing_row_as_the_log_says_it_with_null(imported):
    engine = open_store(imported)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM workitems WHERE workitem_id = 'W2'"))
    engine.dispose()
    out = run("verify", "--db", imported, ok=False).output
    assert ("workitems DIFFERS from a rebuild from the log at seq 6: the store has 0 row(s) the log does not "
            "give, and lacks 1 row(s) it gives") in out
    (line,) = [line for line in out.splitlines() if "store has: " in line]
    assert line.startswith("  workitem_id=W2: store has: no such row / log says: workitem_id=W2, state=NULL, ")
    assert "None" not in out
    assert re.search(f"first_seen_at={ISO_Z}, ", line), line


def test_verify_compares_projection_rows_by_meaning_and_shows_them_so(imported):
    """Stored values that differ only in form (JSON spacing and key order, a timestamp spelled
    another way) are equal; a changed value is reported, its example in the canonical form."""
    engine = open_store(imported)
    sqlite = engine.dialect.name == "sqlite"
    with engine.begin() as conn:
        if sqlite:  # (PostgreSQL keeps jsonb and timestamptz by value: no other form to store)
            conn.execute(text("UPDATE workitems SET capabilities = replace(capabilities, ',', ' ,  '), "
                              "first_seen_at = replace(first_seen_at, ' ', 'T') WHERE workitem_id = 'W1'"))
    result = run("verify", "--db", imported)
    assert "projections ok" in result.output
    with engine.begin() as conn:
        conn.execute(text("UPDATE workitems SET notification_count = notification_count + 1 WHERE workitem_id = 'W1'"))
    engine.dispose()
    report = json.loads(run("verify", "--json", "--db", imported, ok=False).output)
    diff = report["differences"]["workitems"]
    assert (diff["missing"], diff["unexpected"]) == (1, 1)
    (pair,) = diff["pairs"]
    shown = pair["store"]
    assert shown["workitem_id"] == "W1" and re.fullmatch(ISO_Z, shown["first_seen_at"])
    assert int(shown["notification_count"]) == int(pair["log"]["notification_count"]) + 1


def test_verify_detects_counts_that_disagree_with_the_log(imported):
    # status reads event_log_counts; a count changed behind the store's back shows in verify.
    engine = open_store(imported)
    with engine.begin() as conn:
        plain = conn.execute(text("SELECT rows FROM event_log_counts WHERE kind = 'notification' "
                                  "AND quarantine_reason = '' AND duplicate = false")).scalar_one()
        conn.execute(text("UPDATE event_log_counts SET rows = rows + 5 WHERE kind = 'notification' "
                          "AND quarantine_reason = '' AND duplicate = false"))
    engine.dispose()
    assert json.loads(run("status", "--json", "--db", imported).output)["event_log"]["rows"] == 11
    result = run("verify", "--db", imported, ok=False)
    assert "chain ok: 6 rows" in result.output
    assert "event_log_counts DISAGREES for kind notification, quarantine reason NULL, duplicate False: " \
           f"the log holds {plain} rows, event_log_counts says {plain + 5}" in result.output
    report = json.loads(run("verify", "--json", "--db", imported, ok=False).output)
    assert report["counts_mismatch"] == [{"table": "event_log_counts", "kind": "notification",
                                          "quarantine_reason": None, "duplicate": False,
                                          "counted": plain, "recorded": plain + 5}]


def test_status_reads_kept_row_counts_and_verify_checks_them(imported):
    counted = json.loads(run("status", "--json", "--db", imported).output)["tables"]
    engine = open_store(imported)
    with engine.begin() as conn:
        actual = {t.name: conn.execute(text(f"SELECT count(*) FROM {t.name}")).scalar_one()
                  for t in (event_log, *PROJECTION_TABLES)}
        assert all(actual.values())
        conn.execute(text("UPDATE projection_checkpoints SET rows = 99 WHERE projection = 'request_outcomes'"))
    engine.dispose()
    assert {name: counted[name] for name in actual} == actual
    report = json.loads(run("verify", "--json", "--db", imported, ok=False).output)
    assert report["differences"] == {} and report["counts_mismatch"] == [
        {"table": "projection_checkpoints", "projection": "request_outcomes",
         "counted": actual["request_outcomes"], "recorded": 99}]
    run("rebuild", "--db", imported)  # the counts are recomputed with the tables
    run("verify", "--db", imported)


# -- export / import --------------------------------------------------------------------------------

def test_export_then_import_into_an_empty_database(db_url, tmp_path):
    kind = "sqlite" if db_url.startswith("sqlite") else "postgresql"
    run("import", write(tmp_path / "a.jsonl", LINES), "--db", db_url)
    sim = tmp_path / "sim.jsonl"
    run("simulate", "--events", 300, "--agents", 3, "--noise-rate", 0.05, "--duplicate-rate", 0.05, "-o", sim)
    run("import", sim, "--db", db_url)
    run("import", "-", "--db", db_url, input="\n".join([
        envelope(bare(data("StatusChange", "W9", state="Invited")), "agent-x", at(7)),
        "  " + bare(data("PropertiesUpdated", "W9", caps=["A"])) + "  ",
    ]) + "\n")
    exported = tmp_path / "export.jsonl"
    run("export", "-o", exported, "--db", db_url)
    assert len(exported.read_text().splitlines()) == 308
    partial = run("export", "--after-seq", 2, "--upto-seq", 4, "--db", db_url).output.splitlines()
    assert len(partial) == 2 and partial == exported.read_text().splitlines()[2:4]
    with fresh_url(kind) as copy_url:
        run("import", exported, "--db", copy_url)
        a, b = open_store(db_url), open_store(copy_url)
        with a.connect() as ca, b.connect() as cb:
            assert log_rows(cb) == log_rows(ca)
            assert projection_snapshot(cb) == projection_snapshot(ca)
        a.dispose(), b.dispose()
        run("verify", "--db", copy_url)
        assert run("export", "--db", copy_url).output == exported.read_text()


# -- simulate ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["envelope", "bayeux", "bare"])
def test_simulate_is_seeded_and_exact(fmt):
    one = run("simulate", "--events", 250, "--seed", 3, "--format", fmt).output
    two = run("simulate", "--events", 250, "--seed", 3, "--format", fmt).output
    other = run("simulate", "--events", 250, "--seed", 4, "--format", fmt).output
    assert one == two and one != other
    lines = one.splitlines()
    assert len(lines) == 250 and all(lines)
    first = json.loads(lines[0])
    key = {"envelope": "received_at", "bayeux": "channel", "bare": "data"}[fmt]
    assert key in first
    assert run("simulate", "--events", 0).output == ""
    assert len(run("simulate", "--events", 1).output.splitlines()) == 1


def test_simulated_noise_is_quarantined(tmp_path, db_url):
    sim = tmp_path / "noisy.jsonl"
    run("simulate", "--events", 400, "--noise-rate", 0.2, "--seed", 9, "-o", sim)
    assert len(sim.read_text().splitlines()) == 400
    summary = json.loads(run("import", "--json", sim, "--db", db_url).output)["imports"][0]
    assert summary["appended"] == 400 and summary["quarantined"] > 20


# -- choosing the database ----------------------------------------------------------------------

def test_db_as_plain_path_env_var_and_group_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "plain.db"
    run("init", "--db", path)  # a plain file path; the new database is upgraded to head
    run("status", "--db", path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (head_revision(),)
    conn.close()
    run("import", "-", "--db", "plain.db", input=LINES[0] + "\n")  # relative path
    env_path = tmp_path / "env.db"
    run("import", "-", input=LINES[0] + "\n", env={"WORKITEM_STORE_URL": f"sqlite:///{env_path}"})
    run("--db", str(env_path), "import", "-", input=LINES[1] + "\n")  # --db before the command
    assert count(f"sqlite:///{path}") == 1 and count(f"sqlite:///{env_path}") == 2
    status = json.loads(run("status", "--json", env={"WORKITEM_STORE_URL": str(env_path)}).output)
    assert status["event_log"]["rows"] == 2


def test_init_creates_then_reports_the_schema(db_url):
    assert "was empty" in run("init", "--db", db_url).output
    out = run("init", "--db", db_url).output
    assert f"schema at revision {head_revision()}" in out and "was" not in out


def test_bad_database_url_is_a_clear_error():
    result = run("status", "--db", "nosuchdialect://x/y", ok=False)
    assert result.exit_code != 0 and "nosuchdialect" in result.output
    assert "Traceback" not in result.output


def test_demo_ingests_live_from_the_simulator_and_verifies(db_url, monkeypatch):
    """The README's demo: a simulated GWS server, a live ingest, everything published is stored."""
    monkeypatch.setattr(sys, "argv", [".venv/bin/workitem-store", "demo"])  # as the README runs it
    out = run("demo", "--seconds", "1", "--agents", "2", "--rate", "200", "--db", db_url).output
    stored = re.findall(r"(agent-\d+): (\d+) published, (\d+) stored", out)
    assert len(stored) == 2 and all(p == s and int(p) > 0 for _, p, s in stored), out
    assert "verify: chain ok, projections equal a rebuild" in out
    with open_store(db_url).connect() as conn:
        kinds = dict(conn.execute(select(event_log.c.kind, func.count()).group_by(event_log.c.kind)).all())
    # Each session: started, its snapshot, its notifications, ended.
    assert kinds == {"notification": sum(int(s) for _, _, s in stored), "session": 4, "snapshot": 2}
    again = run("demo", "--seconds", "1", "--agents", "2", "--rate", "200", "--db", db_url).output
    assert "agent-001#2:" in again and "verify: chain ok" in again
    hint = out.strip().splitlines()[-1]
    assert hint.endswith(f", or run `.venv/bin/workitem-store status --db {db_url}`."), hint


def test_demo_hint_is_the_command_as_it_was_typed(monkeypatch, tmp_path):
    """The closing hint of the demo runs as printed after the README's first command."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # (the venv's bin not on it, as after the README's line)
    script = tmp_path / ".venv" / "bin" / "workitem-store"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert invocation(".venv/bin/workitem-store") == ".venv/bin/workitem-store"
    assert invocation(str(script)) == ".venv/bin/workitem-store"  # (an absolute argv[0]: shown as typed)
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text("")
    assert invocation("/somewhere/store/__main__.py", str(python)) == ".venv/bin/python -m store"
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    assert invocation(str(script)) == "workitem-store"  # on the PATH: its name
    assert invocation("/elsewhere/a dir/workitem-store") == "'/elsewhere/a dir/workitem-store'"


def test_tables_show_null_apart_from_empty_and_every_timestamp_in_one_form(db_url, tmp_path):
    run("import", write(tmp_path / "a.jsonl", [*LINES, bare(data("StatusChange", "W3", state="Completed", caps=[]))]),
        "--db", db_url)
    rows = dict(line.split(None, 1) for line in run("state", "W2", "--seq", 7, "--db", db_url).output.splitlines()[2:])
    assert rows["state"] == "NULL" and rows["capabilities"] == "NULL" and rows["open_capabilities_since_seq"] == "{}"
    assert re.fullmatch(ISO_Z, rows["first_seen_at"])
    rows = dict(line.split(None, 1) for line in run("state", "W3", "--seq", 7, "--db", db_url).output.splitlines()[2:])
    assert rows["capabilities"] == "[]" and rows["state"] == "Completed"
    found = json.loads(run("state", "W2", "--seq", 7, "--json", "--db", db_url).output)[0]
    assert found["state"] is None and re.fullmatch(ISO_Z, found["first_seen_at"])
    table = run("history", "W1", "--db", db_url).output.splitlines()
    assert all(re.search(f"  {ISO_Z}  ", line) for line in table[2:]), table
    assert all(re.fullmatch(ISO_Z, e["received_at"])
               for e in json.loads(run("history", "W1", "--json", "--db", db_url).output))
    assert all(re.fullmatch(ISO_Z, line.split(",")[1])
               for line in run("history", "W1", "--csv", "--db", db_url).output.splitlines()[1:])
    status = json.loads(run("status", "--json", "--db", db_url).output)
    assert all(re.fullmatch(ISO_Z, c["updated_at"]) for c in status["checkpoints"])
    if db_url.startswith("sqlite"):  # (PostgreSQL: `query` refuses the test's superuser; see test_query_safety.py)
        out = run("query", "SELECT workitem_id, state FROM workitems ORDER BY workitem_id", "--db", db_url).output
        assert out.splitlines()[3].split() == ["W2", "NULL"]


def test_a_timestamp_value_is_shown_in_the_one_form_in_every_format(capsys):
    """As `query` shows PostgreSQL's timestamptz values (SQLite returns stored text)."""
    at = dt.datetime(2026, 11, 2, 9, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    rows = [{"at": at, "none": None, "empty": [], "obj": {"k": at}}]
    shown = {}
    for fmt in (None, "json", "csv"):
        emit_rows(rows, fmt)
        shown[fmt] = capsys.readouterr().out
        assert "+01:00" not in shown[fmt] and "2026-11-02 " not in shown[fmt]
    assert shown[None].splitlines()[2].split()[:4] == ["2026-11-02T08:00:00.123456Z", "NULL", "[]", '{"k":']
    assert json.loads(shown["json"]) == [{"at": "2026-11-02T08:00:00.123456Z", "none": None, "empty": [],
                                          "obj": {"k": "2026-11-02T08:00:00.123456Z"}}]
    assert shown["csv"].splitlines()[1] == '2026-11-02T08:00:00.123456Z,,[],"{""k"": ""2026-11-02T08:00:00.123456Z""}"'
