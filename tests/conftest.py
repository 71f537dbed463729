"""Fixtures: every store test runs on a real SQLite file and on the real PostgreSQL server.

PostgreSQL tests skip when the server is unreachable, except under CI (``CI`` set), where they
fail: CI must run them.  Each PostgreSQL test gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid

import pytest
from cometd_server import cometd, node_modules  # noqa: F401  (fixtures: the Node CometD server)
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from store.db import open_store

FUZZ_ENV = "WORKITEM_STORE_FUZZ_EXAMPLES"


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=0, metavar="N",
                     help="The long fuzzing run: N hypothesis examples per fuzz test (tests/test_fuzz.py), "
                          "and the big hostile lines at 50 times their CI size (50 MB lines).")


def pytest_configure(config):
    if config.getoption("--fuzz-examples"):
        os.environ[FUZZ_ENV] = str(config.getoption("--fuzz-examples"))


@pytest.fixture
def fuzz_scale() -> int:
    return 50 if os.environ.get(FUZZ_ENV) else 1


PG_URL = os.environ.get("WORKITEM_STORE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _admin_engine():
    return create_engine(PG_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def pg_admin():
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "no server"
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI and unreachable at {PG_URL}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {exc}")
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_admin):
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    name = f"wis_test_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    with pg_admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A new, empty database on each engine: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def engine(db_url):
    """An engine on an empty store whose schema is at head."""
    engine = open_store(db_url)
    yield engine
    engine.dispose()
