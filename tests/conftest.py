"""Fixtures: every store test runs on a real SQLite file and on the real PostgreSQL server.

PostgreSQL tests skip when the server is unreachable, except under CI (``CI`` set), where they
fail: CI must run them.  Each PostgreSQL test gets a database of its own (helpers.new_database,
the one way the tests make one), dropped afterwards.
"""

from __future__ import annotations

import os

import pytest
from cometd_server import cometd, node_modules  # noqa: F401  (fixtures: the Node CometD server)
from helpers import PG_URL, new_database
from http_proxy import http_proxy  # noqa: F401  (fixture: an HTTP proxy of the test's own)
from pg_instance import private_postgres  # noqa: F401  (fixture: a PostgreSQL server of the test's own)
from sqlalchemy import create_engine, text

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


@pytest.fixture(scope="session")
def pg_admin():
    """An AUTOCOMMIT engine on the shared server's maintenance database (``PG_URL``); skips the
    test (fails it under CI) when the server does not answer."""
    engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
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
    with new_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine_kind(request) -> str:
    """Each engine in turn: "sqlite", then "postgresql" (only where the server answers: pg_admin)."""
    if request.param == "postgresql":
        request.getfixturevalue("pg_admin")
    return request.param


@pytest.fixture
def db_url(engine_kind, tmp_path, request):
    """A new, empty database on each engine: a SQLite file, then a PostgreSQL database."""
    if engine_kind == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def engine(db_url):
    """An engine on an empty store whose schema is at head."""
    engine = open_store(db_url)
    yield engine
    engine.dispose()
