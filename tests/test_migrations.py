"""Alembic owns the schema: models and migrations agree on both engines; downgrade and upgrade work.

The only tests allowed to call ``metadata.create_all`` (to compare it with the migrated schema).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from helpers import bare, data, feed, fresh_url
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import DBAPIError

from store.db import MIGRATIONS_DIR, alembic_config, current_revision, head_revision, open_store
from store.errors import StoreError
from store.schema import metadata

TABLES = {"event_log", "imported_files", "workitems", "workitem_transitions", "capability_history",
          "request_outcomes", "projection_checkpoints", "projection_errors", "event_log_counts", "seals",
          "store_identity", "redactions"}


def _diff(engine) -> list:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(context, metadata)


def _tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def _triggers(engine) -> set[str]:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        else:
            sql = ("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal "
                   "AND tgrelid IN ('event_log'::regclass, 'seals'::regclass, 'store_identity'::regclass, "
                   "'redactions'::regclass)")
        return set(conn.execute(text(sql)).scalars())


def test_models_and_migrations_agree(engine):
    assert _tables(engine) == TABLES
    assert _diff(engine) == []
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()


def test_migrated_schema_equals_create_all(db_url):
    kind = "sqlite" if db_url.startswith("sqlite") else "postgresql"
    migrated = open_store(db_url)
    with fresh_url(kind) as other:
        created = create_engine(other)
        metadata.create_all(created)
        a, b = inspect(migrated), inspect(created)

        def shape(insp, table):
            columns = [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)]
            indexes = sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(table))
            pk = insp.get_pk_constraint(table)
            return columns, indexes, (pk["name"], tuple(pk["constrained_columns"]))

        for table in TABLES:
            assert shape(a, table) == shape(b, table), table
        created.dispose()
    migrated.dispose()


def test_append_only_triggers_are_installed(engine):
    tables = ("event_log", "seals", "store_identity", "redactions")
    expected = {"sqlite": {f"{t}_no_{verb}" for t in tables for verb in ("update", "delete")},
                "postgresql": {f"{t}_no_{verb}" for t in tables[1:] for verb in ("update_delete", "truncate")}
                | {"event_log_no_update", "event_log_no_delete", "event_log_no_truncate"},  # (0008: redactions)
                }[engine.dialect.name]
    assert _triggers(engine) == expected


def test_downgrade_to_base_then_upgrade_to_head(engine):
    feed(engine, [bare(data())])
    views = set(inspect(engine).get_view_names())
    with engine.begin() as conn:  # one step down and up again, with data in the tables
        command.downgrade(alembic_config(conn), "-1")
        command.upgrade(alembic_config(conn), "head")
    assert set(inspect(engine).get_view_names()) == views
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert _tables(engine) == set()
    assert inspect(engine).get_view_names() == []
    with engine.connect() as conn:
        assert current_revision(conn) is None
        if engine.dialect.name == "postgresql":
            functions = text("SELECT count(*) FROM pg_proc "
                             "WHERE proname IN ('event_log_append_only', 'event_log_redaction_only')")
            assert conn.execute(functions).scalar_one() == 0
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
    assert _tables(engine) == TABLES
    assert set(inspect(engine).get_view_names()) == views
    assert _diff(engine) == []
    assert _triggers(engine)
    feed(engine, [bare(data())])
    with pytest.raises(DBAPIError, match="append-only"):
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM event_log"))


def test_an_unknown_revision_is_refused_with_advice(engine):
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    with pytest.raises(StoreError, match="workitem-store init"):
        open_store(str(engine.url.render_as_string(hide_password=False)))


def test_alembic_command_line_upgrades_a_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'by-hand.db'}"
    alembic = Path(sys.executable).with_name("alembic")
    subprocess.run([str(alembic), "-c", str(MIGRATIONS_DIR / "alembic.ini"), "-x", f"url={url}", "upgrade", "head"],
                   check=True, capture_output=True, cwd=tmp_path)
    engine = open_store(url)  # already at head: used as it is
    assert _tables(engine) == TABLES
    assert _diff(engine) == []
    engine.dispose()


# -- a store made by the previous version ---------------------------------------------------------

FIXTURE = Path(__file__).parent / "data" / "store-0.1.0.db.gz"  # made by workitem-store 0.1.0 (revision 0002)


def _fixture_rows() -> tuple[list[dict], list[dict]]:
    """event_log and imported_files of the fixture, as stored by 0.1.0."""
    import gzip
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "old.db"
        path.write_bytes(gzip.decompress(FIXTURE.read_bytes()))
        conn = sqlite3.connect(path)
        conn.row_factory = sqlite3.Row
        try:
            return ([dict(r) for r in conn.execute("SELECT * FROM event_log ORDER BY seq")],
                    [dict(r) for r in conn.execute("SELECT * FROM imported_files ORDER BY id")])
        finally:
            conn.close()


def test_a_store_of_the_previous_version_upgrades_in_place_with_its_chain(db_url, tmp_path):
    """`workitem-store init` on a store made by 0.1.0: the same rows, the same chain head, verify
    passes; the projections (whose rules changed) are rebuilt by the next `project`."""
    from click.testing import CliRunner

    from store.cli import main

    old_log, old_files = _fixture_rows()
    if db_url.startswith("sqlite"):
        import gzip
        path = tmp_path / "old.db"
        path.write_bytes(gzip.decompress(FIXTURE.read_bytes()))
        db_url = f"sqlite:///{path}"
    else:  # the same rows in a PostgreSQL store at revision 0002
        engine = create_engine(db_url)
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0002")
            for table, rows in (("event_log", old_log), ("imported_files", old_files)):
                columns = list(rows[0])
                conn.execute(text(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                                  f"({', '.join(':' + c for c in columns)})"), rows)
        engine.dispose()
    with pytest.raises(StoreError, match="workitem-store init"):
        open_store(db_url)  # other commands refuse an old schema
    runner = CliRunner()
    result = runner.invoke(main, ["init", "--db", db_url])
    assert result.exit_code == 0 and "was 0002" in result.output, result.output
    result = runner.invoke(main, ["verify", "--db", db_url])
    assert "chain ok: 530 rows" in result.output  # (the old projections may differ: their rules changed)
    result = runner.invoke(main, ["project", "--db", db_url])
    assert "-> 530" in result.output, result.output  # (SQLite: "rebuilt ...", the old tables were behind)
    result = runner.invoke(main, ["verify", "--db", db_url])
    assert result.exit_code == 0, result.output  # event_log_counts, filled by 0005, included
    status = json.loads(runner.invoke(main, ["status", "--db", db_url, "--json"]).output)["event_log"]
    assert status["rows"] == 530 and status["kinds"]["notification"] == 530
    assert status["duplicates"] == sum(r["duplicate_of"] is not None for r in old_log)
    assert status["quarantined"] == sum(r["quarantine_reason"] is not None for r in old_log) > 0
    assert f"head seq 530 {old_log[-1]['chain_hash']}" in result.output
    engine = open_store(db_url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text("SELECT * FROM event_log ORDER BY seq"))]
    engine.dispose()
    assert [(r["seq"], r["payload"], r["chain_hash"], r["kind"], r["session"]) for r in rows] == [
        (r["seq"], r["payload"], r["chain_hash"], "notification", None) for r in old_log]


def test_a_store_at_revision_0005_upgrades_to_seals(db_url, tmp_path):
    """`workitem-store init` on a store of the version before seals (0005), with rows: the chain
    kept, one store_identity row made, and then `seal` and `verify` with its seals pass."""
    from click.testing import CliRunner

    from store.cli import main
    from store.projections import runner

    engine = open_store(db_url)
    feed(engine, [bare(data(wid=f"w{i}", state="Processing")) for i in range(7)])
    runner.project(engine)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0005")  # as 0005 left it, with its rows
        head = tuple(conn.execute(text("SELECT seq, chain_hash FROM event_log ORDER BY seq DESC LIMIT 1")).one())
    assert {"seals", "store_identity"}.isdisjoint(_tables(engine))
    engine.dispose()
    with pytest.raises(StoreError, match="workitem-store init"):
        open_store(db_url)
    cli = CliRunner()
    result = cli.invoke(main, ["init", "--db", db_url])
    assert result.exit_code == 0 and "was 0005" in result.output, result.output
    engine = create_engine(db_url)
    with engine.connect() as conn:
        identity = conn.execute(text("SELECT store_id, created_at FROM store_identity")).all()
        last = text("SELECT seq, chain_hash FROM event_log ORDER BY seq DESC LIMIT 1")
        assert tuple(conn.execute(last).one()) == head
    engine.dispose()
    assert len(identity) == 1 and len(identity[0].store_id) == 36 and identity[0].created_at.endswith("Z")
    assert cli.invoke(main, ["keygen", str(tmp_path / "k")]).exit_code == 0
    witness = tmp_path / "w.jsonl"
    result = cli.invoke(main, ["seal", "--key", str(tmp_path / "k"), "--witness", str(witness), "--db", db_url])
    assert result.exit_code == 0 and "sealed: seal 1, seq 7" in result.output, result.output
    assert json.loads(witness.read_text())["store_id"] == identity[0].store_id
    result = cli.invoke(main, ["verify", "--db", db_url, "--witness", str(witness),
                                  "--public-key", str(tmp_path / "k.pub")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("seals ok: 1 seals, signatures checked, newest 1 at seq 7")


def test_a_sealed_store_at_revision_0006_upgrades_with_its_seals(db_url, tmp_path):
    """`workitem-store init` on a store of the version before workitem_summary (0006), sealed:
    the seals still verify after the upgrade, and the new view answers."""
    from helpers import run

    from store.projections import runner

    engine = open_store(db_url)
    feed(engine, [bare(data(wid=f"w{i}", state="Processing")) for i in range(5)])
    runner.project(engine)
    engine.dispose()
    run("keygen", tmp_path / "k")
    witness = tmp_path / "w.jsonl"
    run("seal", "--key", tmp_path / "k", "--witness", witness, "--db", db_url)
    engine = create_engine(db_url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0006")
    assert "workitem_summary" not in inspect(engine).get_view_names()
    engine.dispose()
    assert "was 0006" in run("init", "--db", db_url).output
    result = run("verify", "--db", db_url, "--witness", witness, "--public-key", tmp_path / "k.pub")
    assert result.output.startswith("seals ok: 1 seals, signatures checked, newest 1 at seq 5")
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM workitem_summary")).scalar_one() == 5
    engine.dispose()
