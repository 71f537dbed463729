"""`query` is safe with any URL, and commands that only read never create a store.

* SQLite: `query` only reads (an authorizer refuses ATTACH, PRAGMAs that write, DDL, ...) and is
  cancelled after --timeout;
* PostgreSQL: `query` refuses a role that can do more than read (a superuser reads the server's
  files even in a read-only transaction), and --timeout bounds it; `grant-readonly` makes a role
  that passes, cannot create temporary tables and cannot connect to other databases;
* no password of a database URL appears in any message;
* status, verify, history, state, export and query refuse a missing file, a file or database
  that is no store, and create nothing.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from helpers import bayeux, data, new_database, run
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from store.errors import hide_password, safe_url

LINES = [
    bayeux(data("StatusChange", "W1", state="Invited", caps=["Accept"], ref=1), mid="1"),
    bayeux(data("StatusChange", "W1", state="Processing", caps=["Complete"], ref=2), mid="2"),
]
# A recursive CTE that would count for minutes.
LONG_QUERY = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
              "SELECT COUNT(*) FROM c")
SECRET = "s3cretPW-4711"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(url: str) -> None:
    """A store at ``url`` holding LINES (one workitem), projected."""
    run("import", "-", "--db", url, input="\n".join(LINES) + "\n")


@pytest.fixture
def sqlite_store(tmp_path) -> Path:
    path = tmp_path / "store.db"
    load(path)
    return path


# -- SQLite ---------------------------------------------------------------------------------------

def test_sqlite_attach_is_refused_and_creates_no_file(sqlite_store, tmp_path):
    before = digest(sqlite_store)
    for target in ("ATTACH DATABASE '{}' AS x", "ATTACH '{}' AS x"):
        path = tmp_path / f"attached-{uuid.uuid4().hex[:6]}.db"
        result = run("query", target.format(path), "--db", sqlite_store, ok=False)
        assert result.exit_code == 1 and "Error: not authorized: ATTACH" in result.output, result.output
        assert "is refused by `query`" in result.output and "Traceback" not in result.output
        assert not path.exists()
    # VACUUM INTO writes a file too: refused within query's transaction (and, outside one, by the
    # authorizer: it ATTACHes its target).
    path = tmp_path / "vacuumed.db"
    result = run("query", f"VACUUM INTO '{path}'", "--db", sqlite_store, ok=False)
    assert result.exit_code == 1 and "VACUUM" in result.output and not path.exists()
    assert digest(sqlite_store) == before


@pytest.mark.parametrize("sql, refused", [
    ("DETACH main", "DETACH"),
    ("PRAGMA writable_schema = 1", "PRAGMA writable_schema"),
    ("PRAGMA writable_schema", "PRAGMA writable_schema"),
    ("PRAGMA user_version = 7", "PRAGMA user_version = 7"),
    ("PRAGMA journal_mode = DELETE", "PRAGMA journal_mode"),
    ("CREATE TEMP TABLE t (x)", "CREATE TEMP TABLE t"),
    ("CREATE TEMP VIEW v AS SELECT 1", "CREATE TEMP VIEW v"),
    ("CREATE TEMP TRIGGER g AFTER INSERT ON workitems BEGIN SELECT 1; END", "CREATE TEMP TRIGGER g"),
    ("CREATE VIRTUAL TABLE temp.v USING fts5(x)", "CREATE VTABLE v"),
    ("CREATE TABLE t (x)", "CREATE TABLE t"),
    ("CREATE INDEX i ON workitems (state)", "CREATE INDEX i"),
    ("DROP VIEW capability_timeline", "DROP VIEW capability_timeline"),
    ("ALTER TABLE workitems ADD COLUMN x", "ALTER TABLE"),
    ("INSERT INTO projection_checkpoints VALUES ('x', 0, 1, '2026-01-01')", "INSERT projection_checkpoints"),
    ("UPDATE workitems SET state = 'Gone'", "UPDATE workitems"),
    ("DELETE FROM workitems", "DELETE workitems"),
    ("SELECT load_extension('/tmp/x.so')", "function load_extension()"),
    ("SELECT fts3_tokenizer('simple')", "function fts3_tokenizer()"),
    ("COMMIT", "TRANSACTION COMMIT"),
    ("SAVEPOINT s", "SAVEPOINT"),
    ("ANALYZE", "sqlite_stat1"),
])
def test_sqlite_query_refuses_anything_but_reading(sqlite_store, sql, refused):
    before = digest(sqlite_store)
    result = run("query", sql, "--db", sqlite_store, ok=False)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: not authorized: ") and refused in result.output, result.output
    assert digest(sqlite_store) == before


def test_sqlite_query_reads_with_ctes_functions_and_harmless_pragmas(sqlite_store):
    def rows(sql):
        return json.loads(run("query", sql, "--json", "--db", sqlite_store).stdout)

    assert rows("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100) "
                "SELECT COUNT(*) AS n, upper('a') AS u FROM c") == [{"n": 100, "u": "A"}]
    assert rows("SELECT workitem_id, state FROM workitems") == [{"workitem_id": "W1", "state": "Processing"}]
    assert {r["name"] for r in rows("PRAGMA table_info(workitems)")} >= {"workitem_id", "state"}
    assert {r["name"] for r in rows("SELECT name FROM pragma_table_info('workitems')")} >= {"workitem_id"}
    assert rows("PRAGMA index_list(event_log)")
    assert rows("PRAGMA user_version") == [{"user_version": 0}]
    assert rows("SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table'")[0]["n"] > 5


def test_sqlite_long_query_is_cancelled_by_timeout(sqlite_store):
    started = time.monotonic()
    result = run("query", LONG_QUERY, "--timeout", 1, "--db", sqlite_store, ok=False)
    elapsed = time.monotonic() - started
    assert result.exit_code == 1 and "Error: query cancelled after 1 s (--timeout)" in result.output
    assert elapsed < 10, elapsed
    # The fence is gone afterwards: the next query of the same process runs normally.
    assert json.loads(run("query", "SELECT 1 AS one", "--json", "--db", sqlite_store).stdout) == [{"one": 1}]


def test_timeout_must_be_positive(sqlite_store):
    for bad in ("0", "-1", "x"):
        result = run("query", "SELECT 1", "--timeout", bad, "--db", sqlite_store, ok=False)
        assert result.exit_code == 2 and "--timeout" in result.output


def test_as_and_password_env_are_for_postgresql(sqlite_store):
    result = run("query", "SELECT 1", "--as", "analyst", "--db", sqlite_store, ok=False)
    assert result.exit_code == 1 and "--as is for PostgreSQL" in result.output
    result = run("query", "SELECT 1", "--password-env", "PW", "--db", sqlite_store, ok=False)
    assert result.exit_code == 2 and "--password-env goes with --as" in result.output


# -- readers never create a store -----------------------------------------------------------------

READERS = [
    ["status"], ["verify"], ["history", "W1"], ["state", "W1", "--seq", "1"], ["export"], ["query", "SELECT 1"],
]


@pytest.mark.parametrize("command", READERS, ids=lambda c: c[0])
def test_readers_refuse_a_missing_sqlite_file_and_create_nothing(tmp_path, command):
    path = tmp_path / "typo.db"
    result = run(*command, "--db", path, ok=False)
    assert result.exit_code == 1
    assert f"no store at {path}" in result.output and "workitem-store init" in result.output
    assert "workitem-store import" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", READERS, ids=lambda c: c[0])
def test_readers_refuse_a_file_that_is_not_a_store(tmp_path, command):
    empty = tmp_path / "empty.db"
    empty.touch()  # e.g. truncated to 0 bytes
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE notes (x)")
    conn.close()
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a database at all\n" * 100)
    for path in (empty, other, text_file):
        before = digest(path)
        result = run(*command, "--db", path, ok=False)
        assert result.exit_code == 1 and f"{path} is not a workitem store" in result.output, result.output
        assert "chain ok" not in result.output
        assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "notes.txt", "other.db"]


def test_readers_refuse_an_outdated_store(sqlite_store):
    conn = sqlite3.connect(sqlite_store)
    conn.execute("UPDATE alembic_version SET version_num = '0001'")
    conn.commit()
    conn.close()
    for command in READERS:
        result = run(*command, "--db", sqlite_store, ok=False)
        assert "schema is at revision 0001" in result.output and "workitem-store init" in result.output


def test_verify_and_status_of_a_new_store_made_by_init(tmp_path):
    path = tmp_path / "new.db"
    run("init", "--db", path)
    assert "chain ok: 0 rows" in run("verify", "--db", path).output
    assert "event_log: 0 rows" in run("status", "--db", path).output


@pytest.mark.postgres
def test_readers_refuse_a_postgresql_database_without_the_schema(pg_url):
    for command in READERS:
        result = run(*command, "--db", pg_url, ok=False)
        assert result.exit_code == 1 and "is not a workitem store" in result.output, result.output
        assert make_url(pg_url).database in result.output
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:  # nothing was created
            assert conn.execute(text("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'")).scalar_one() == 0
    finally:
        engine.dispose()


# -- PostgreSQL: the role `query` runs as ----------------------------------------------------------

class Roles:
    """Roles made for one test (cluster-wide objects), dropped afterwards."""

    def __init__(self, url: str, admin):
        self.url, self.admin, self.names = url, admin, []

    def new(self, prefix: str = "wis_qs") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        return name

    def url_of(self, name: str) -> str:
        return make_url(self.url).set(username=name).render_as_string(hide_password=False)

    def admin_sql(self, *statements: str, database: str | None = None) -> None:
        engine = create_engine(make_url(self.url).set(database=database) if database else self.url,
                               isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for sql in statements:
                    conn.execute(text(sql))
        finally:
            engine.dispose()


@pytest.fixture
def roles(pg_url, pg_admin):
    made = Roles(pg_url, pg_admin)
    yield made
    # Runs before pg_url's teardown: DROP OWNED BY in the test database revokes what the roles
    # were granted there and on the database itself.
    made.admin_sql(*(f'DROP OWNED BY "{n}"' for n in made.names if _role_exists(pg_admin, n)))
    with pg_admin.connect() as conn:
        for name in made.names:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"), {"r": name})
            conn.execute(text(f'DROP ROLE IF EXISTS "{name}"'))


def _role_exists(admin, name: str) -> bool:
    with admin.connect() as conn:
        return conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": name}).first() is not None


def grant_reader(pg_url: str, roles: Roles, *options: str) -> str:
    """A grant-readonly role (other databases left alone: --keep-connect '*'); its name."""
    role = roles.new()
    run("grant-readonly", role, "--login", "--with-log", "--keep-connect", "*", *options, "--db", pg_url)
    return role


@pytest.mark.postgres
def test_superuser_query_cannot_read_a_server_file(pg_url):
    load(pg_url)
    for sql in ("SELECT pg_read_file('/etc/passwd')",
                "SELECT pg_read_file('/etc/passwd') FROM workitems",
                # SET ROLE inside the statement itself: why checking once, up front, is the rule.
                ("SELECT set_config('role', 'postgres', false), "
                 "query_to_xml('SELECT pg_read_file(''/etc/passwd'')', true, false, '')")):
        result = run("query", sql, "--db", pg_url, ok=False)
        assert result.exit_code == 1 and "root:" not in result.output
        assert "refuses to run as PostgreSQL role postgres: it is a superuser" in result.output, result.output
        assert "workitem-store grant-readonly ROLE --login" in result.output and "--as ROLE" in result.output


@pytest.mark.postgres
def test_superuser_query_cannot_run_a_program(pg_url, tmp_path):
    load(pg_url)
    marker = Path("/tmp") / f"wis-qs-{uuid.uuid4().hex}"  # the server's /tmp: the same machine here
    try:
        for sql in (f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
                    f"SELECT query_to_xml('COPY (SELECT 1) TO PROGRAM ''touch {marker}''', true, false, '')"):
            result = run("query", sql, "--db", pg_url, ok=False)
            assert result.exit_code == 1 and "it is a superuser" in result.output, result.output
        time.sleep(0.2)
        assert not marker.exists()
    finally:
        marker.unlink(missing_ok=True)


@pytest.mark.postgres
def test_grant_readonly_role_passes_and_cannot_reach_files_or_programs(pg_url, roles):
    load(pg_url)
    role = grant_reader(pg_url, roles)
    url = roles.url_of(role)
    assert json.loads(run("query", "SELECT COUNT(*) AS n FROM event_log", "--json", "--db", url).stdout) == [{"n": 2}]
    # The same role through --as, with the owner's URL.
    assert json.loads(run("query", "SELECT current_user AS u", "--json", "--as", role, "--db", pg_url).stdout) == [
        {"u": role}]
    marker = Path("/tmp") / f"wis-qs-{uuid.uuid4().hex}"
    for sql in ("SELECT pg_read_file('/etc/passwd')", "SELECT pg_ls_dir('/')",
                f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
                "SELECT set_config('role', 'postgres', false)",
                "SELECT lo_import('/etc/passwd')"):
        result = run("query", sql, "--as", role, "--db", pg_url, ok=False)
        assert result.exit_code == 1 and "root:" not in result.output, (sql, result.output)
    assert not marker.exists()


@pytest.mark.postgres
def test_query_as_the_grant_readonly_role_cannot_sleep_past_its_timeout(pg_url, roles):
    load(pg_url)
    role = grant_reader(pg_url, roles)
    started = time.monotonic()
    result = run("query", "SELECT pg_sleep(30)", "--timeout", 1, "--as", role, "--db", pg_url, ok=False)
    assert time.monotonic() - started < 8
    assert result.exit_code == 1 and "Error: query cancelled after 1 s (--timeout)" in result.output
    # Turning the timeout off inside the statement does not help it.
    started = time.monotonic()
    result = run("query", "SELECT set_config('statement_timeout', '0', true), pg_sleep(30)", "--timeout", 1,
                 "--as", role, "--db", pg_url, ok=False)
    assert time.monotonic() - started < 8 and "query cancelled after 1 s" in result.output


@pytest.mark.postgres
def test_query_refuses_roles_that_can_do_more_than_read(pg_url, roles):
    load(pg_url)
    database = make_url(pg_url).database
    # A role that can SET ROLE to a superuser, one that may write a table, a member of
    # pg_read_server_files, and a plain role (PUBLIC's default TEMPORARY on the database).
    member, writer, reader_of_files, plain = (roles.new() for _ in range(4))
    roles.admin_sql(
        *(f'CREATE ROLE "{name}" LOGIN' for name in (member, writer, reader_of_files, plain)),
        f'GRANT postgres TO "{member}"',
        f'GRANT pg_read_server_files TO "{reader_of_files}"')
    roles.admin_sql(*(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{name}"'
                      for name in (member, writer, reader_of_files, plain)),
                    f'GRANT INSERT ON workitems TO "{writer}"', database=database)
    expected = {member: "a member of postgres", writer: "it may write workitems",
                reader_of_files: "it is a member of pg_read_server_files",
                plain: f"it may TEMPORARY on database {database}"}
    for name, reason in expected.items():
        result = run("query", "SELECT COUNT(*) FROM workitems", "--as", name, "--db", pg_url, ok=False)
        assert result.exit_code == 1 and f"refuses to run as PostgreSQL role {name}" in result.output
        assert reason in result.output and "grant-readonly ROLE --login" in result.output, result.output


# -- grant-readonly: no temporary tables, no other database ---------------------------------------

@pytest.fixture
def other_database(pg_admin):
    """A private database besides the store's (not named wis_*), dropped afterwards."""
    with new_database(prefix="qsafety_other") as url:
        yield make_url(url).database


@pytest.mark.postgres
def test_grant_readonly_role_cannot_create_temp_tables_nor_connect_elsewhere(pg_url, roles, pg_admin,
                                                                             other_database):
    load(pg_url)
    store_db = make_url(pg_url).database
    with pg_admin.connect() as conn:
        others = conn.execute(text("SELECT datname FROM pg_database WHERE datname NOT IN (:a, :b)"),
                              {"a": store_db, "b": other_database}).scalars().all()
    role = roles.new()
    # Only the private database may change: the shared cluster's databases (and those other
    # tests create meanwhile, wis_*) are kept as they are.
    keep = [opt for name in others for opt in ("--keep-connect", name)] + ["--keep-connect", "wis_*"]
    result = run("grant-readonly", role, "--login", *keep, "--db", pg_url, ok=None)
    revoked_line = next((line for line in result.output.splitlines() if line.startswith("revoked CONNECT")), "")
    try:
        assert result.exit_code == 0, result.output
        assert f"revoked TEMPORARY on database {store_db} from PUBLIC" in result.output
        assert revoked_line.startswith(f"revoked CONNECT from PUBLIC and from {role} on database(s) {other_database}:")
        assert f"{role} can still connect to (--keep-connect): " in result.output

        analyst = create_engine(roles.url_of(role), isolation_level="AUTOCOMMIT")
        try:
            with analyst.connect() as conn, pytest.raises(
                    DBAPIError, match="permission denied to create temporary tables"):
                conn.execute(text("CREATE TEMP TABLE scratch (x integer)"))
        finally:
            analyst.dispose()
        elsewhere = create_engine(make_url(roles.url_of(role)).set(database=other_database))
        try:
            with pytest.raises(DBAPIError, match=f'permission denied for database "{other_database}"'), \
                    elsewhere.connect():
                pass
        finally:
            elsewhere.dispose()
        # And the role is one `query` accepts.
        assert json.loads(run("query", "SELECT COUNT(*) AS n FROM workitems", "--json", "--as", role,
                              "--db", pg_url).stdout) == [{"n": 1}]
    finally:
        # Should a database created meanwhile (no wis_* name) have been touched, give it back.
        changed = revoked_line.split(" on database(s) ", 1)[-1].split(":", 1)[0].split(", ") if revoked_line else []
        with pg_admin.connect() as conn:
            for name in changed:
                if name and name != other_database:
                    conn.execute(text(f'GRANT CONNECT ON DATABASE "{name}" TO PUBLIC'))


# -- no password in any message -------------------------------------------------------------------

def test_hide_password_in_urls_and_conninfo():
    assert hide_password(f"postgresql://u:{SECRET}@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert hide_password(f"x postgresql+psycopg://u:p@ss{SECRET}@h/db y") == "x postgresql+psycopg://u:***@h/db y"
    assert hide_password(f"host=h password={SECRET} dbname=d") == "host=h password=*** dbname=d"
    assert hide_password(f"host=h password = '{SECRET} x\\' y' dbname=d") == "host=h password = *** dbname=d"
    assert hide_password("postgresql://u@h/db and sqlite:///a:b@c") == "postgresql://u@h/db and sqlite:///a:b@c"
    assert safe_url(f"postgresql://u:{SECRET}@h/db") == "postgresql://u:***@h/db"
    assert safe_url(f"postgresql://u:{SECRET}@h:port/db") == "postgresql://u:***@h:port/db"


@pytest.mark.parametrize("url", [
    f"postgresql://u:{SECRET}@127.0.0.1:notaport/db",  # make_url cannot read it
    f"nosuchdialect://u:{SECRET}@h/db",  # no such dialect
    f"postgresql+nosuchdriver://u:{SECRET}@h/db",  # no such driver
    f"postgresql://u:{SECRET}@127.0.0.1:1/db",  # nothing listens: a connection error
    f"postgresql://u:{SECRET}@127.0.0.1:5432/db?sslmode=bogus",  # libpq refuses an option
])
def test_no_password_in_any_message(url, tmp_path):
    for command in (["status"], ["query", "SELECT 1"], ["import", "-"], ["init"]):
        result = run(*command, "--db", url, ok=False)
        assert result.exit_code == 1 and SECRET not in result.output, (command, result.output)
        assert "Traceback" not in result.output
    result = run("query", "SELECT 1", "--as", "analyst", "--password-env", "PW", "--db", url,
                 env={"PW": SECRET}, ok=False)
    assert SECRET not in result.output, result.output


@pytest.mark.postgres
def test_no_password_in_messages_of_a_reachable_server(pg_url):
    load(pg_url)
    url = make_url(pg_url).set(username="wis_qs_nobody", password=SECRET).render_as_string(hide_password=False)
    result = run("status", "--db", url, ok=False)  # trust authentication: the role does not exist
    assert result.exit_code == 1 and SECRET not in result.output and "wis_qs_nobody" in result.output
    result = run("query", "SELECT 1", "--as", "wis_qs_nobody", "--password-env", "PW", "--db", pg_url,
                 env={"PW": SECRET}, ok=False)
    assert result.exit_code == 1 and SECRET not in result.output
