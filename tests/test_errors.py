"""Every expected error is one line ``Error: ...`` on standard error with exit status 1 (a command
line that is wrong: click's usage error, exit status 2), never a traceback; and commands that
only read never create a store."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import bare, data, run
from sqlalchemy.engine import make_url

from store.cli import main


def error(*args, code: int = 1, env: dict | None = None, input: str | None = None) -> str:
    """Run ``workitem-store ARGS``; assert it fails with ``code`` and no traceback; the message
    of its one ``Error: ...`` line on standard error (for a usage error: its last line)."""
    result = CliRunner().invoke(main, [str(a) for a in args], env=env, input=input)
    assert result.exit_code == code, (args, result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception  # (not an exception out of the command)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    if code == 1:
        assert len(lines) == 1, result.stderr
    assert lines[-1].startswith("Error: "), result.stderr
    return lines[-1].removeprefix("Error: ")


def no_store_message(path: Path) -> str:
    return f"no store at {path} (create one with `workitem-store init --db {path}` or `workitem-store import`)"


READ_ONLY = [
    ["status"], ["status", "--json"], ["verify"], ["verify", "--json"], ["history", "W1"], ["state", "W1", "--seq", 1],
    ["state", "W1", "--as-of", "2026-11-02T08:00:00Z"], ["export"], ["export", "-o", "{tmp}/out.jsonl"],
    ["prove", 1], ["query", "SELECT 1"],
]


@pytest.mark.parametrize("args", READ_ONLY, ids=lambda a: " ".join(map(str, a)))
@pytest.mark.parametrize("how", ["path", "url", "env"])
def test_read_only_commands_on_a_missing_store_fail_and_create_nothing(args, how, tmp_path):
    missing = tmp_path / "typo.db"
    args = [str(a).format(tmp=tmp_path) for a in args]
    db = {"path": ["--db", str(missing)], "url": ["--db", f"sqlite:///{missing}"], "env": []}[how]
    env = {"WORKITEM_STORE_URL": str(missing)} if how == "env" else None
    assert error(*args, *db, env=env) == no_store_message(missing)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not the store, nor -wal, -shm, nor the output file


def test_a_missing_directory_of_the_store_is_named(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "x.db"
    assert error("status", "--db", missing) == no_store_message(missing)
    assert not (tmp_path / "no").exists()


def test_a_directory_as_the_store(tmp_path):
    assert error("status", "--db", tmp_path) == (
        f"no store at {tmp_path} (it is a directory; create one with `workitem-store init --db "
        f"{tmp_path / 'workitems.db'}` or `workitem-store import`)")
    message = error("import", "-", "--db", tmp_path, input="")
    assert str(tmp_path) in message, message


def test_a_file_that_is_no_store(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    assert error("status", "--db", other) == f"{other} is not a workitem store (not a SQLite database)"
    assert other.read_text() == "hello\n"


def test_the_real_process_prints_one_line(tmp_path):
    """The installed entry point, not only click's test runner: one line on stderr, exit 1."""
    missing = tmp_path / "x.db"
    done = subprocess.run([sys.executable, "-m", "store", "status", "--db", str(missing)], capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"Error: {no_store_message(missing)}\n")
    assert not missing.exists()


# -- files the user names ---------------------------------------------------------------------------

def test_bench_workdir_that_cannot_be_made(tmp_path):
    # (/nonexistent itself would be created when running as root: a parent that does not exist,
    # and a directory the kernel refuses, stand for it.)
    assert error("bench", "--workdir", tmp_path / "no" / "sub") == (
        f"workdir {tmp_path / 'no' / 'sub'}: its parent directory {tmp_path / 'no'} does not exist")
    assert error("bench", "--workdir", "/proc/nonexistent") == (
        "cannot create workdir /proc/nonexistent: No such file or directory")
    assert not (tmp_path / "no").exists()


def test_import_of_what_is_not_a_readable_file(tmp_path):
    db = tmp_path / "s.db"
    missing = tmp_path / "missing.jsonl"
    assert error("import", missing, "--db", db) == f"{missing}: no such file"
    assert error("import", tmp_path, "--db", db) == f"{tmp_path} is a directory"
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert error("import", empty, "--db", db) == f"{empty} is empty: nothing to import"
    if sys.platform.startswith("linux"):
        # A regular file whose reading fails (EIO), whoever runs the test (root reads chmod 000 files).
        assert error("import", "/proc/self/mem", "--db", db).startswith("cannot read /proc/self/mem")


def test_import_refuses_what_is_not_text_unless_force(tmp_path):
    db = tmp_path / "s.db"
    binary = tmp_path / "capture.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    message = error("import", binary, "--db", db)
    assert str(binary) in message and "--force" in message, message
    run("import", binary, "--force", "--db", db)


def test_import_reads_a_compressed_file(tmp_path):
    db = tmp_path / "s.db"
    path = tmp_path / "capture.jsonl.gz"
    path.write_bytes(gzip.compress((bare(data(wid="W1", state="Invited")) + "\n").encode()))
    out = run("import", path, "--db", db).output
    assert "capture.jsonl.gz: 1 appended (seq 1-1), 0 duplicate, 0 quarantined" in out


def test_output_file_in_a_missing_directory(tmp_path):
    db = tmp_path / "s.db"
    run("init", "--db", db)
    target = tmp_path / "no" / "out.jsonl"
    assert error("export", "-o", target, "--db", db) == f"cannot write {target}: No such file or directory"
    assert error("simulate", "--events", 1, "-o", target) == f"cannot write {target}: No such file or directory"


def test_library_errors_of_commands_without_a_database(tmp_path):
    key = tmp_path / "seal.key"
    run("keygen", key)
    assert error("keygen", key).startswith(f"{key} exists")
    assert error("seal", "--key", tmp_path / "none.key", "--db", tmp_path / "s.db") == (
        f"cannot read the seal key {tmp_path / 'none.key'}: No such file or directory")
    assert not (tmp_path / "s.db").exists()
    assert error("ingest", "--config", tmp_path / "none.toml", "--db", tmp_path / "s.db").startswith(
        f"cannot read {tmp_path / 'none.toml'}")


# -- time stamps --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["yesterday", "2026-11-02T25:00:00Z", "2026-11-02x08:00:00", "08:00", "2026-13-01"])
def test_a_timestamp_that_is_none_is_a_usage_error(value, tmp_path):
    message = error("state", "W1", "--as-of", value, "--db", tmp_path / "s.db", code=2)
    assert message.startswith("Invalid value for '--as-of': ") and repr(value) in message, message
    message = error("simulate", "--start", value, code=2)
    assert message.startswith("Invalid value for '--start': "), message
    assert list(tmp_path.iterdir()) == []


def test_every_timestamp_form_is_accepted(tmp_path):
    db = tmp_path / "s.db"
    run("import", "-", "--db", db, input=(
        '{"received_at": "2026-11-02T08:00:00Z", "source": "a", "message": ' + bare(data(wid="W1", state="Invited"))
        + "}\n"))
    for value in ("2026-11-02T08:00:00Z", "2026-11-02T08:00:00.000000Z", "2026-11-02 08:00:00+00:00",
                  "2026-11-02T09:00:00+01:00", "2026-11-02T08:00:00", "2026-11-02 08:00", "2026-11-02t08:00:00z"):
        assert "Invited" in run("state", "W1", "--as-of", value, "--db", db).output, value
    assert error("state", "W1", "--as-of", "2026-11-02T07:59:59.999999Z", "--db", db) == (
        "workitem 'W1' was not known as of 2026-11-02T07:59:59.999999Z")


# -- URLs and usage -----------------------------------------------------------------------------------

@pytest.mark.postgres
def test_postgres_scheme_is_accepted(pg_url):
    url = make_url(pg_url)
    short = url.set(drivername="postgres").render_as_string(hide_password=False)
    assert short.startswith("postgres://")
    assert "was empty" in run("init", "--db", short).output
    assert "event_log: 0 rows" in run("status", "--db", short).output


def test_a_bad_url_is_one_line():
    assert "nosuchdialect" in error("status", "--db", "nosuchdialect://x/y")


@pytest.mark.parametrize("args", [["state", "W1", "--db", "x.db"], ["import"], ["nosuchcommand"],
                                  ["status", "--nosuchoption"], ["history", "--json", "--raw-csv", "W1"]])
def test_usage_errors_exit_2(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error(*args, code=2)
    assert list(tmp_path.iterdir()) == []
