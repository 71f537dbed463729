"""``workitem-store bench``: every step, ratio and goal line is printed with plausible numbers, on
SQLite and on PostgreSQL, and nothing is left behind (files, throwaway databases)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from conftest import PG_URL
from helpers import feed, tamper_log
from sqlalchemy import select, text

from store import log
from store import verify as verify_mod
from store.bench import ORDER, parse_steps
from store.cli import main
from store.db import open_reader, snapshot
from store.schema import event_log
from store.simulate import simulate
from store.verify import VerifyReport

STEP_LINE = re.compile(r"^(append|raw|import|project|rebuild|raw-projections|verify-chain|raw-chain|verify|forget) "
                       r"+([\d,]+) "
                       r"events/s +"
                       r"([\d.]+) s +peak RSS +(\d+) MB ")
VERIFY_CHAIN_NOTE = re.compile(r"\(with columns ([\d,]+) events/s, ([\d.]+) s\)$")
AUDIT_LINE = re.compile(r"^audit +(history|state --as-of) +median +([\d.]+) ms, max +([\d.]+) ms over 50 calls"
                        r".*peak RSS (\d+) MB$")
RATIO_LINE = re.compile(r"^ +(PostgreSQL )?(append|import) / raw (insert|COPY): ([\d.]+)x")
PROJECTION_RATIO_LINE = re.compile(r"^  (project|rebuild) / raw (insert|COPY) of the projection rows it writes: "
                                   r"([\d.]+)x$")
CEILING_LINE = re.compile(r"^  raw (insert|COPY) of the log rows and of their projection rows, one after the other "
                          r"\(what import cannot beat here\): ([\d,]+) events/s$")
GOAL_LINE = re.compile(r"^  (rebuild >=|append >=|import >=|peak RSS|history, state|verify chain >=|full verify >="
                       r"|forget >=)"
                       r".* (ok|MISSED|n/a)$")


def _bench(*args: str) -> list[str]:
    result = CliRunner().invoke(main, ["bench", "--events", "300", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output.splitlines()


def _check_report(lines: list[str], raw: str) -> list[str]:
    """Asserts the report's shape; returns its goal lines."""
    assert lines[0].startswith("300 simulated notifications (")
    steps = {m[1]: m for m in map(STEP_LINE.match, lines) if m}
    assert set(steps) == set(ORDER) - {"audit"}
    for m in steps.values():
        assert int(m[2].replace(",", "")) > 0 and float(m[3]) >= 0 and int(m[4]) > 0
    # verify-chain: the chain part alone, then with the extracted columns (as verify runs them).
    columns = VERIFY_CHAIN_NOTE.search(steps["verify-chain"].string)
    assert columns and int(columns[1].replace(",", "")) > 0 and float(columns[2]) >= 0
    assert "FAILED" not in "\n".join(lines)
    audits = {m[1]: m for m in map(AUDIT_LINE.match, lines) if m}
    assert set(audits) == {"history", "state --as-of"}
    for m in audits.values():
        assert 0 < float(m[2]) <= float(m[3]) and int(m[4]) > 0
    ratios = {m[2]: m for m in map(RATIO_LINE.match, lines) if m}
    assert set(ratios) == {"append", "import"}
    for m in ratios.values():
        assert m[3] == raw and float(m[4]) > 0
    # import = append + project on a fresh store, both timed within the step (comparing its rate
    # with the append step's, at 300 events, is timing noise on a busy machine).
    parts = re.search(r"\(append ([\d.]+) s \+ project ([\d.]+) s\)$", steps["import"].string)
    assert parts and float(parts[1]) > 0 and float(parts[2]) > 0
    # The projections' baseline: its rows are the rebuild's, inserted raw in the same tables.
    assert "into workitems, workitem_transitions, capability_history, request_outcomes, one transaction" \
        in steps["raw-projections"].string
    projection_ratios = {m[1]: m for m in map(PROJECTION_RATIO_LINE.match, lines) if m}
    assert set(projection_ratios) == {"project", "rebuild"}
    assert all(m[2] == raw and float(m[3]) > 0 for m in projection_ratios.values())
    [ceiling] = [m for m in map(CEILING_LINE.match, lines) if m]
    rates = {name: int(m[2].replace(",", "")) for name, m in steps.items()}
    # Two baselines one after the other: slower than either alone (rounding aside).
    assert ceiling[1] == raw and int(ceiling[2].replace(",", "")) <= min(rates["raw"], rates["raw-projections"])
    # The chain's baseline: the same hashes with no store code, over the same rows (all of them).
    assert "HASH DIFFERS" not in steps["raw-chain"].string
    [chain_ratio] = [line for line in lines
                     if line.startswith("  verify-chain / the chain checked with no store code: ")]
    assert float(chain_ratio.split()[-1].rstrip("x")) > 0
    goals = lines[lines.index("goals:") + 1:-1]
    assert len(goals) == 9 and all(map(GOAL_LINE.match, goals)), goals
    assert lines[-1].startswith("measured ")
    return goals


def _goal(goals: list[str], start: str) -> str:
    [line] = [g for g in goals if g.strip().startswith(start)]
    return line.split()[-1]


def test_bench_sqlite_reports_every_step_and_leaves_nothing(tmp_path):
    workdir = tmp_path / "work"  # created by the bench
    lines = _bench("--workdir", str(workdir))
    goals = _check_report(lines, "insert")
    assert any(line.startswith("  append / raw insert: ") and line.endswith("(target >= 0.45)") for line in lines)
    assert _goal(goals, "append >= 0.4 of raw COPY") == "n/a"
    assert _goal(goals, "append >= 0.45") in ("ok", "MISSED")
    assert _goal(goals, "peak RSS") == "ok"
    assert _goal(goals, "verify chain >= 300,000 events/s (SQLite)") in ("ok", "MISSED")
    assert _goal(goals, "full verify >= 50,000 events/s (SQLite)") in ("ok", "MISSED")
    assert list(workdir.iterdir()) == []


@pytest.mark.postgres
def test_bench_postgresql_reports_every_step_and_drops_its_databases(pg_admin, tmp_path):
    lines = _bench("--workdir", str(tmp_path), "--db", PG_URL)
    goals = _check_report(lines, "COPY")
    assert any(line.startswith("  PostgreSQL append / raw COPY: ") and line.endswith("(target >= 0.4)")
               for line in lines)
    assert _goal(goals, "append >= 0.45") == "n/a"
    assert _goal(goals, "append >= 0.4 of raw COPY") in ("ok", "MISSED")
    assert _goal(goals, "verify chain >=") == _goal(goals, "full verify >=") == "n/a"  # SQLite goals
    prefix = re.search(r"throwaway databases (wis_bench_[0-9a-f]+)_\*", lines[0])[1]
    with pg_admin.connect() as conn:
        left = conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE :p"),
                            {"p": prefix + "%"}).scalars().all()
    assert left == []
    assert list(tmp_path.iterdir()) == []


def test_bench_steps_subset_runs_what_they_need(tmp_path):
    assert parse_steps("verify") == ("append", "project", "verify")
    assert parse_steps("verify-chain") == ("append", "verify-chain")
    assert parse_steps(" rebuild , raw") == ("append", "raw", "rebuild")
    assert parse_steps("raw-projections") == ("append", "rebuild", "raw-projections")
    assert parse_steps(None) == ORDER
    result = CliRunner().invoke(main, ["bench", "--events", "100", "--steps", "import", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    steps = [m[1] for m in map(STEP_LINE.match, result.output.splitlines()) if m]
    assert steps == ["import"]
    assert "not measured (step not run)" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--db", "sqlite:///x.db"], "bench --db takes a PostgreSQL URL"),
    (["--workdir", "/nonexistent-parent-of-bench/work"], "its parent directory"),
    (["--steps", "append,nope"], "unknown step(s) nope"),
])
def test_bench_refuses_cleanly(args, message):
    result = CliRunner().invoke(main, ["bench", "--events", "100", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, TypeError))


def test_bench_takes_the_db_given_before_the_command_name():
    result = CliRunner().invoke(main, ["--db", "sqlite:///x.db", "bench", "--events", "100"])
    assert result.exit_code == 1
    assert "bench --db takes a PostgreSQL URL (got sqlite:///x.db)" in result.output


# -- verify's chain: the bulk path reports what the row-by-row reference reports -----------------

def test_verify_chain_bulk_path_reports_as_the_row_by_row_reference(engine, monkeypatch):
    """verify_chain checks chunks of rows the store wrote in bulk (``_links_fast``) and any other
    chunk row by row (``_links_exact``); whatever is wrong, both make the same report, from seq 1
    and from a later start, with and without the column check."""
    feed(engine, list(simulate(400, agents=5, seed=3, noise_rate=0.05)), source="sim")
    reader = open_reader(engine.url.render_as_string(hide_password=False))
    plain_times = verify_mod._plain_times

    def reports(after: int = 0, after_hash: str = log.GENESIS_HASH):
        found = []
        for bulk in (True, False):
            monkeypatch.setattr(verify_mod, "_plain_times", plain_times if bulk else lambda *a: None)
            for columns in (True, False):
                with snapshot(reader) as conn:
                    report = VerifyReport()
                    verify_mod.verify_chain(conn, report, chunk=64, after=after, after_hash=after_hash,
                                            columns=columns)
                found.append(report)
        assert found[0] == found[2] and found[1] == found[3]
        return found[0]

    with snapshot(engine) as conn:
        hashes = dict(conn.execute(select(event_log.c.seq, event_log.c.chain_hash)).all())
    assert reports().ok and reports(100, hashes[100]).ok
    tampering = [
        ("UPDATE event_log SET workitem_id = 'forged' WHERE seq = 330", "column_mismatch", 330),
        ("UPDATE event_log SET payload = payload || ' ' WHERE seq = 350", "chain_break", 350),
        ("UPDATE event_log SET chain_hash = 'x' WHERE seq = 300", "chain_break", 300),
        ("DELETE FROM event_log WHERE seq = 250", "chain_break", 250),
        ("UPDATE event_log SET received_at = '2026-11-02 08:00:00' WHERE seq = 200", "chain_break", 200),
    ]
    for sql, problem, seq in tampering:
        tamper_log(engine, sql)
        assert getattr(reports(), problem).seq == seq, sql
        assert getattr(reports(100, hashes[100]), problem).seq == seq, sql
    reader.dispose()
