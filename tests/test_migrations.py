"""Alembic owns the schema: models and migrations agree on both engines; downgrade and upgrade work.

The only tests allowed to call ``metadata.create_all`` (to compare it with the migrated schema).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import DBAPIError

from helpers import bare, data, feed, fresh_url
from store.db import MIGRATIONS_DIR, StoreError, alembic_config, current_revision, head_revision, open_store
from store.schema import metadata

TABLES = {"event_log", "imported_files", "workitems", "workitem_transitions", "capability_history",
          "request_outcomes", "projection_checkpoints"}


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
            sql = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgrelid = 'event_log'::regclass"
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
        for table in TABLES:
            def shape(insp):
                columns = [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)]
                indexes = sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(table))
                pk = insp.get_pk_constraint(table)
                return columns, indexes, (pk["name"], tuple(pk["constrained_columns"]))
            assert shape(a) == shape(b), table
        created.dispose()
    migrated.dispose()


def test_append_only_triggers_are_installed(engine):
    expected = {"sqlite": {"event_log_no_update", "event_log_no_delete"},
                "postgresql": {"event_log_no_update_delete", "event_log_no_truncate"}}[engine.dialect.name]
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
            assert conn.execute(text("SELECT count(*) FROM pg_proc WHERE proname = 'event_log_append_only'")).scalar_one() == 0
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
