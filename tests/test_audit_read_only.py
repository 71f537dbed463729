"""Read-only access for analysts, on both engines: ``query`` cannot write and the reading
commands leave a store unchanged; ``grant-readonly`` roles (PostgreSQL) can only SELECT.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import uuid
from pathlib import Path

import pytest
from audit_trail import TRAIL_LINES, W1_SEQS, t
from helpers import kind_of, load_store, row_count, run
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sqlite_store(tmp_path):
    path = tmp_path / "store.db"
    load_store(f"sqlite:///{path}", TRAIL_LINES)
    return path


WRITES = [
    "DELETE FROM workitems",
    "UPDATE workitems SET state = 'Gone'",
    "INSERT INTO workitems (workitem_id, first_seq, last_seq, first_seen_at, last_seen_at, notification_count, "
    "error_count) VALUES ('X', 1, 1, '2026-11-02 08:00:00.000000', '2026-11-02 08:00:00.000000', 1, 0)",
    "DROP VIEW capability_timeline",
    "CREATE TABLE scratch (x INTEGER)",
    "PRAGMA user_version = 7",
]


def test_query_cannot_change_a_sqlite_store(sqlite_store):
    before = file_digest(sqlite_store)
    assert row_count(str(sqlite_store), "workitems") == 2
    for sql in WRITES:
        result = run("query", sql, "--db", sqlite_store, ok=False)
        # Refused by query's authorizer before it runs (the file is open read-only besides).
        assert result.exit_code == 1 and "is refused by `query`" in result.output, (sql, result.output)
    assert row_count(str(sqlite_store), "workitems") == 2
    assert file_digest(sqlite_store) == before


def test_reading_commands_leave_a_sqlite_store_unchanged(sqlite_store, tmp_path):
    before = file_digest(sqlite_store)
    run("history", "W1", "--db", sqlite_store)
    run("state", "W1", "--seq", 4, "--db", sqlite_store)
    run("state", "W1", "--as-of", t(5).isoformat(), "--db", sqlite_store)
    run("status", "--db", sqlite_store)
    run("verify", "--db", sqlite_store)
    run("export", "-o", tmp_path / "out.jsonl", "--db", sqlite_store)
    run("query", "SELECT COUNT(*) FROM event_log", "--db", sqlite_store)
    assert file_digest(sqlite_store) == before
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == len(TRAIL_LINES)


@pytest.fixture
def query_url(db_url, request):
    """Where `query` runs on db_url: the SQLite file itself; on PostgreSQL the URL of a
    grant-readonly role (`query` refuses db_url's superuser)."""
    if kind_of(db_url) == "sqlite":
        return db_url
    roles = request.getfixturevalue("roles")
    role = roles.new()
    run("grant-readonly", "--keep-connect", "*", role, "--login", "--with-log", "--db", db_url)
    return roles.url_of(role)


def test_query_selects_as_table_csv_and_json(db_url, query_url):
    load_store(db_url, TRAIL_LINES)
    db_url = query_url
    sql = "SELECT workitem_id, state, notification_count FROM workitems ORDER BY workitem_id"
    assert json.loads(run("query", sql, "--json", "--db", db_url).stdout) == [
        {"workitem_id": "W1", "state": "Completed", "notification_count": 6},
        {"workitem_id": "W2", "state": "Invited", "notification_count": 1},
    ]
    rows = list(csv.reader(io.StringIO(run("query", sql, "--csv", "--db", db_url).stdout)))
    assert rows == [["workitem_id", "state", "notification_count"], ["W1", "Completed", "6"], ["W2", "Invited", "1"]]
    table = run("query", sql, "--db", db_url).stdout.splitlines()
    assert table[0].split() == ["workitem_id", "state", "notification_count"]
    assert [line.split() for line in table[2:]] == [["W1", "Completed", "6"], ["W2", "Invited", "1"]]


def test_query_keeps_colon_and_percent_literals(db_url, query_url):
    load_store(db_url, TRAIL_LINES)
    db_url = query_url
    sql = ("SELECT 'a:b' AS colon, ':name' AS named, '100%' AS pct, '%s %(x)s' AS formats, COUNT(*) AS n "
           "FROM event_log WHERE source LIKE 'agent-%' AND payload LIKE '%\"referenceId\": %'")
    assert json.loads(run("query", sql, "--json", "--db", db_url).stdout) == [
        {"colon": "a:b", "named": ":name", "pct": "100%", "formats": "%s %(x)s", "n": 11}]


def test_query_runs_in_a_read_only_transaction(db_url, query_url):
    load_store(db_url, TRAIL_LINES)
    for sql in ("DELETE FROM workitems", "UPDATE workitems SET state = 'Gone'"):
        result = run("query", sql, "--db", query_url, ok=False)
        assert result.exit_code == 1 and "Traceback" not in result.output
    assert row_count(db_url, "workitems") == 2


@pytest.mark.postgres
@pytest.mark.parametrize("escape", ["COMMIT; ", "SET TRANSACTION READ WRITE; "])
def test_query_cannot_leave_the_read_only_transaction_on_postgresql(pg_url, roles, escape):
    load_store(pg_url, TRAIL_LINES)
    role = roles.new()
    run("grant-readonly", "--keep-connect", "*", role, "--login", "--db", pg_url)
    result = run("query", escape + "DELETE FROM workitems", "--db", roles.url_of(role), ok=None)
    assert row_count(pg_url, "workitems") == 2
    assert result.exit_code != 0


# -- grant-readonly (PostgreSQL) ------------------------------------------------------------------

class Roles:
    """Roles made for one test, with engines connecting as them; all dropped afterwards."""

    def __init__(self, url: str):
        self.url = url
        self.names: list[str] = []
        self.engines = []

    def new(self) -> str:
        # Mixed case and a hyphen: the role name must be quoted everywhere.
        name = f"wis_RO-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        return name

    def engine(self, name: str):
        engine = create_engine(make_url(self.url).set(username=name), isolation_level="AUTOCOMMIT")
        self.engines.append(engine)
        return engine

    def url_of(self, name: str) -> str:
        return make_url(self.url).set(username=name).render_as_string(hide_password=False)


@pytest.fixture
def roles(pg_url, pg_admin):
    made = Roles(pg_url)
    yield made
    for engine in made.engines:
        engine.dispose()
    # This teardown runs before pg_url's (it was set up after): the test database still exists, and
    # DROP OWNED BY there revokes the role's privileges on it and on the database itself.
    owner = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with owner.connect() as conn:
            for name in made.names:
                if conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": name}).first():
                    conn.execute(text(f'DROP OWNED BY "{name}"'))
    finally:
        owner.dispose()
    with pg_admin.connect() as conn:
        for name in made.names:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"),
                         {"r": name})
            conn.execute(text(f'DROP ROLE IF EXISTS "{name}"'))


def attempt(engine, sql: str) -> Exception | None:
    """Run one statement (committed if it works); the error, or None."""
    try:
        with engine.connect() as conn:
            result = conn.exec_driver_sql(sql)
            if result.returns_rows:
                result.all()
    except DBAPIError as exc:
        return exc
    return None


def role_attributes(pg_url: str, name: str):
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(
                "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolpassword IS NOT NULL AS has_password "
                "FROM pg_authid WHERE rolname = :r"), {"r": name}).first()
    finally:
        engine.dispose()


PROJECTIONS_AND_VIEWS = ["workitems", "workitem_transitions", "capability_history", "request_outcomes",
                         "workitem_state_durations", "request_outcome_summary", "capability_timeline"]
FORBIDDEN_WRITES = {
    "workitems": ["INSERT INTO workitems (workitem_id, first_seq, last_seq, first_seen_at, last_seen_at, "
                  "notification_count, error_count) VALUES ('X', 1, 1, now(), now(), 1, 0)",
                  "UPDATE workitems SET state = 'Gone'", "DELETE FROM workitems"],
    "workitem_transitions": ["UPDATE workitem_transitions SET to_state = 'Gone'", "DELETE FROM workitem_transitions"],
    "capability_history": ["UPDATE capability_history SET revoked_seq = 1", "DELETE FROM capability_history"],
    "request_outcomes": ["UPDATE request_outcomes SET outcome = 'failed'", "DELETE FROM request_outcomes"],
    "projection_checkpoints": ["UPDATE projection_checkpoints SET last_seq = 0"],
    "capability_timeline": ["UPDATE capability_timeline SET revoked_seq = 1", "DELETE FROM capability_timeline",
                            "INSERT INTO capability_timeline (workitem_id, capability, granted_seq, granted_at) "
                            "VALUES ('X', 'Y', 1, now())"],
    "workitem_state_durations": ["DELETE FROM workitem_state_durations"],
    "request_outcome_summary": ["DELETE FROM request_outcome_summary"],
}


def snapshot_counts(url: str) -> dict[str, int]:
    names = [*PROJECTIONS_AND_VIEWS, "projection_checkpoints", "event_log", "imported_files"]
    return {name: row_count(url, name) for name in names}


@pytest.mark.postgres
def test_grant_readonly_role_can_only_select_projections_and_views(pg_url, roles):
    load_store(pg_url, TRAIL_LINES)
    role = roles.new()
    result = run("grant-readonly", "--keep-connect", "*", role, "--login", "--db", pg_url)
    assert f"role {role} may SELECT" in result.output and "event_log" not in result.output
    attributes = role_attributes(pg_url, role)
    assert (attributes.rolcanlogin, attributes.rolsuper, attributes.rolcreatedb, attributes.rolcreaterole) == (
        True, False, False, False)
    counts = snapshot_counts(pg_url)
    analyst = roles.engine(role)
    with analyst.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar_one() == role
        for name in [*PROJECTIONS_AND_VIEWS, "projection_checkpoints"]:
            assert len(conn.execute(text(f"SELECT * FROM {name}")).all()) == counts[name], name
    for statements in FORBIDDEN_WRITES.values():
        for sql in statements:
            assert attempt(analyst, sql) is not None, sql
    for sql in ("SELECT COUNT(*) FROM event_log", "SELECT * FROM imported_files",
                "INSERT INTO imported_files (file_name, sha256, rows, imported_at) VALUES ('x', 'y', 0, now())",
                "CREATE TABLE scratch (x integer)", "CREATE SCHEMA scratch", "CREATE VIEW v AS SELECT 1 AS x"):
        error = attempt(analyst, sql)
        assert error is not None and "permission denied" in str(error.orig), (sql, error)
    assert snapshot_counts(pg_url) == counts
    # The analyst's own commands: query works, history needs the log.
    url = roles.url_of(role)
    assert json.loads(run("query", "SELECT COUNT(*) AS n FROM capability_timeline", "--json", "--db", url).stdout) == [
        {"n": counts["capability_timeline"]}]
    result = run("history", "W1", "--db", url, ok=False)
    assert result.exit_code == 1 and "permission denied" in result.output


@pytest.mark.postgres
def test_grant_readonly_with_log_lets_the_role_audit(pg_url, roles):
    load_store(pg_url, TRAIL_LINES)
    role = roles.new()
    result = run("grant-readonly", "--keep-connect", "*", role, "--login", "--with-log", "--db", pg_url)
    assert "event_log" in result.output and "imported_files" in result.output
    url = roles.url_of(role)
    entries = json.loads(run("history", "W1", "--json", "--db", url).stdout)
    assert [e["seq"] for e in entries] == W1_SEQS
    (found,) = json.loads(run("state", "W1", "--seq", 4, "--json", "--db", url).stdout)
    assert found["state"] == "Processing"
    verified = run("verify", "--db", url).output
    assert "chain ok: 12 rows" in verified and "no seals" in verified  # (it reads seals, store_identity)
    assert "chain head: seq 12" in run("status", "--db", url).output
    analyst = roles.engine(role)
    counts = snapshot_counts(pg_url)
    for sql in ("INSERT INTO event_log (seq, received_at, source, payload, payload_sha256, chain_hash) "
                "VALUES (99, now(), 'x', '{}', 'x', 'x')",
                "UPDATE imported_files SET rows = 0", "DELETE FROM workitems", "CREATE TABLE scratch (x integer)"):
        assert attempt(analyst, sql) is not None, sql
    assert snapshot_counts(pg_url) == counts
    # Granting again without --with-log takes the log away.
    run("grant-readonly", "--keep-connect", "*", role, "--db", pg_url)
    assert attempt(analyst, "SELECT COUNT(*) FROM event_log") is not None
    assert attempt(analyst, "SELECT COUNT(*) FROM workitems") is None
    run("history", "W1", "--db", url, ok=False)


@pytest.mark.postgres
def test_grant_readonly_login_and_password(pg_url, roles, pg_admin):
    load_store(pg_url, TRAIL_LINES[:2])
    plain = roles.new()
    run("grant-readonly", "--keep-connect", "*", plain, "--db", pg_url)
    assert role_attributes(pg_url, plain).rolcanlogin is False  # a new role without --login cannot log in
    with pytest.raises(DBAPIError):
        with roles.engine(plain).connect():
            pass
    run("grant-readonly", "--keep-connect", "*", plain, "--login", "--db", pg_url)
    assert role_attributes(pg_url, plain).rolcanlogin is True
    run("grant-readonly", "--keep-connect", "*", plain, "--db", pg_url)
    assert role_attributes(pg_url, plain).rolcanlogin is True  # an existing role keeps what it had

    secret = "s3cr'et pw"
    with_password = roles.new()
    result = run("grant-readonly", "--keep-connect", "*", with_password, "--password-env", "ANALYST_PW", "--db", pg_url,
                 env={"ANALYST_PW": secret})
    assert secret not in result.output
    attributes = role_attributes(pg_url, with_password)
    assert (attributes.rolcanlogin, attributes.has_password) == (True, True)
    assert attempt(roles.engine(with_password), "SELECT COUNT(*) FROM workitems") is None

    missing = roles.new()
    result = run("grant-readonly", "--keep-connect", "*", missing, "--password-env", "NO_SUCH_VAR_WIS", "--db", pg_url,
                 env={"NO_SUCH_VAR_WIS": None}, ok=False)
    assert result.exit_code == 1 and "NO_SUCH_VAR_WIS" in result.output
    assert role_attributes(pg_url, missing) is None


def test_grant_readonly_refuses_sqlite(tmp_path):
    result = run("grant-readonly", "--keep-connect", "*", "analyst", "--login", "--db", tmp_path / "s.db", ok=False)
    assert result.exit_code == 1 and "PostgreSQL" in result.output
