"""Large imports commit in steps and resume after a failure (docs/RULES.md, section 2).

The step size is made small (COMMIT_LINES) so that a few hundred lines take several steps; the
lines carry their own received_at and source (export's envelope), so a stepped or resumed
import must give exactly the rows, chain hashes included, of a single-transaction import.
"""

from __future__ import annotations

import json
import threading

import pytest
from click.testing import CliRunner
from helpers import fresh_store, log_rows
from sqlalchemy import select

from store.cli import main
from store.db import open_store
from store.errors import StoreError
from store.ingest import files
from store.projections import runner
from store.schema import imported_files
from store.simulate import simulate
from store.verify import verify

LINES = 230


class Interrupted(Exception):
    """What a Ctrl-C (or a lost database connection) does to an import half-way."""


@pytest.fixture
def big_file(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "BATCH_LINES", 20)
    monkeypatch.setattr(files, "COMMIT_LINES", 60)
    path = tmp_path / "capture.jsonl"
    lines = simulate(LINES, agents=3, seed=5, noise_rate=0, duplicate_rate=0.05)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _records(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(imported_files).order_by(imported_files.c.id))]


def _whole(path, kind: str, monkeypatch) -> list[dict]:
    """The rows of the same file imported in one transaction, in a store of the same engine."""
    with monkeypatch.context() as m, fresh_store(kind) as engine:
        m.setattr(files, "COMMIT_LINES", 10**9)
        assert files.import_file(engine, path).commits == 1
        with engine.connect() as conn:
            return log_rows(conn)


def test_a_large_file_commits_in_steps_with_the_rows_of_one_transaction(engine, big_file, monkeypatch):
    result = files.import_file(engine, big_file)
    assert result.commits == 4 and result.appended == LINES and result.resumed_at is None
    [record] = _records(engine)
    assert record["complete"] is True and record["resume_offset"] is None
    assert (record["rows"], record["first_seq"], record["last_seq"]) == (LINES, 1, LINES)
    runner.project(engine)
    with engine.connect() as conn:
        rows = log_rows(conn)
        assert verify(conn).ok
    assert rows == _whole(big_file, engine.dialect.name, monkeypatch)
    with pytest.raises(files.AlreadyImported):
        files.import_file(engine, big_file)


def test_an_interrupted_import_is_visible_and_resumes_where_it_stopped(engine, big_file, monkeypatch):
    url = engine.url.render_as_string(hide_password=False)
    seen = []

    def stop_in_the_third_step(consumed):
        seen.append(consumed)
        if len(seen) == 7:  # batches 1-3 are step 1, 4-6 step 2: step 3 never commits
            raise Interrupted

    with pytest.raises(Interrupted):
        files.import_file(engine, big_file, progress=stop_in_the_third_step)
    [record] = _records(engine)
    offset = sum(seen[:6])
    assert (record["complete"], record["resume_offset"], record["rows"]) == (False, offset, 120)
    lines = big_file.read_bytes()
    assert lines[:offset].count(b"\n") == 120 and lines[offset - 1:offset] == b"\n"

    cli = CliRunner()
    status = cli.invoke(main, ["status", "--db", url])
    assert status.exit_code == 0 and "INCOMPLETE import of capture.jsonl" in status.output, status.output
    assert f"120 rows, {offset} bytes in the log" in status.output
    assert json.loads(cli.invoke(main, ["status", "--db", url, "--json"]).output)["incomplete_imports"] == [
        {"file_name": "capture.jsonl", "sha256": record["sha256"], "rows": 120, "first_seq": 1, "last_seq": 120,
         "resume_offset": offset}]

    resumed = cli.invoke(main, ["import", "--db", url, str(big_file)])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming an incomplete import at byte {offset}" in resumed.output
    assert "110 appended (seq 121-230)" in resumed.output
    [record] = _records(engine)
    assert (record["complete"], record["resume_offset"], record["rows"], record["first_seq"], record["last_seq"]) == (
        True, None, LINES, 1, LINES)
    with engine.connect() as conn:
        assert verify(conn).ok
        rows = log_rows(conn)
    assert rows == _whole(big_file, engine.dialect.name, monkeypatch)
    assert "INCOMPLETE" not in cli.invoke(main, ["status", "--db", url]).output
    again = cli.invoke(main, ["import", "--db", url, str(big_file)])
    assert again.exit_code != 0 and "already imported" in again.output


def test_two_processes_resuming_one_file_never_append_it_twice(db_url, big_file, monkeypatch):
    engine = open_store(db_url)
    calls = []

    def stop(consumed):
        calls.append(consumed)
        if len(calls) == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        files.import_file(engine, big_file, progress=stop)
    outcomes: list = []

    def resume():
        try:
            outcomes.append(files.import_file(engine, big_file).appended)
        except StoreError as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=resume) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    # One finished the file; the other found it complete, or found its record moved on.
    finished = [n for n in outcomes if isinstance(n, int)]
    assert len(outcomes) == 2 and len(finished) == 1, outcomes
    assert set(outcomes) - set(finished) <= {"AlreadyImported", "ConcurrentImport"}
    with engine.connect() as conn:
        assert [r["seq"] for r in log_rows(conn)] == list(range(1, LINES + 1))
        assert verify(conn).chain_break is None
        rows = log_rows(conn)
    assert rows == _whole(big_file, engine.dialect.name, monkeypatch)
    [record] = _records(engine)
    assert record["complete"] and record["rows"] == LINES
    engine.dispose()


def test_standard_input_and_small_files_stay_one_transaction(engine, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(line + "\n" for line in simulate(50, agents=2, seed=1)))
    assert files.import_file(engine, small).commits == 1
    with small.open("rb") as stream:
        result = files.import_stream(engine, stream, file_name="stdin", source="stdin")
    assert result.commits == 1
    assert [r["complete"] for r in _records(engine)] == [True, True]
