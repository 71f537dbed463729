"""The documentation stays true: SQL examples run, CLI.md is current, every column is documented.

(a) Every ```sql block of docs/SQL.md runs on SQLite and on PostgreSQL (```sql sqlite and
    ```sql postgresql blocks on their engine only) against a store filled with the demo stream,
    and returns rows, unless the block is preceded by ``<!-- test: may return no rows -->``
    (data-dependent) or ``<!-- test: no rows -->`` (a check that must find nothing).
(b) docs/CLI.md is exactly the output of scripts/gen_cli_docs.py and names every command.
(c) Every table of store.schema.metadata (and every view of store.schema.views_metadata) and
    each of its columns is documented in docs/SQL.md (and nothing documented there is missing
    from the schema).
(d) The hash chain formula as docs/RULES.md states it reproduces every stored chain_hash.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from helpers import PG_URL, create_database, drop_database
from sqlalchemy import select, text

from store import schema
from store.cli import main as cli_main
from store.db import open_store
from store.ingest.files import import_lines
from store.projections import runner
from store.query import grant_readonly
from store.schema import event_log, metadata
from store.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SQL_MD = DOCS / "SQL.md"
RULES_MD = DOCS / "RULES.md"
CLI_MD = DOCS / "CLI.md"
ENGINES = ("sqlite", "postgresql")


# -- (a) SQL examples ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SqlBlock:
    sql: str
    engines: tuple[str, ...]
    expect: str  # "rows", "any" (may be empty) or "none" (must be empty)
    line: int
    heading: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")[:40]
        return f"L{self.line}-{slug}"


_FENCE = re.compile(r"^```(\S*)[ \t]*(.*)$")
_MARKER = re.compile(r"<!--\s*test:\s*(may return no rows|no rows)\s*-->")


def sql_blocks(markdown: str) -> list[SqlBlock]:
    """Every fenced block whose info string starts with ``sql``."""
    blocks: list[SqlBlock] = []
    lines = markdown.splitlines()
    heading, marker, i = "", None, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        found = _MARKER.search(line)
        if found:
            marker = found.group(1)
        fence = _FENCE.match(line)
        if fence:
            info, rest = fence.group(1), fence.group(2).split()
            start = i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if info == "sql":
                if not rest:
                    engines = ENGINES
                else:
                    assert len(rest) == 1 and rest[0] in ENGINES, (
                        f"docs/SQL.md line {start + 1}: unknown sql block variant {rest!r}")
                    engines = (rest[0],)
                expect = {"may return no rows": "any", "no rows": "none", None: "rows"}[marker]
                blocks.append(SqlBlock("\n".join(body), engines, expect, start + 1, heading))
            marker = None
        elif line.strip() and not found:
            marker = None  # a marker applies to the block right after it
        i += 1
    return blocks


BLOCKS = sql_blocks(SQL_MD.read_text(encoding="utf-8"))
CASES = [
    pytest.param(engine, block, id=f"{engine}-{block.id}",
                 marks=[pytest.mark.postgres] if engine == "postgresql" else [])
    for block in BLOCKS for engine in block.engines
]


def test_sql_md_has_examples():
    assert len(BLOCKS) >= 20
    portable = [b for b in BLOCKS if b.engines == ENGINES]
    assert len(portable) >= 15, "most examples must be portable"
    for engine in ENGINES:
        assert any(b.engines == (engine,) for b in BLOCKS)


def live_capture() -> list[str]:
    from helpers import live, marker, snapshot, started

    at = dt.datetime(2026, 11, 2, 12, 0, tzinfo=dt.UTC)
    second = dt.timedelta(seconds=1)
    invited = {"messageType": "WorkitemStateChangeMessage", "notificationType": "StatusChange",
               "workitem": {"id": "LIVE0000000001", "state": "Invited", "capabilities": ["Accept", "Reject"]}}
    return [
        started("agent-001", "i1/agent-001/1", at),
        snapshot("agent-001", "i1/agent-001/1", at + second, []),
        live(invited, "agent-001", "i1/agent-001/1", at + 2 * second),
        marker("agent-001", "i1/agent-001/1", "lost", at + 3 * second, cause="402::session_unknown"),
        started("agent-001", "i1/agent-001/2", at + 120 * second),
        snapshot("agent-001", "i1/agent-001/2", at + 121 * second, [
            {"id": "LIVE0000000002", "state": "Processing", "capabilities": ["Complete"]}]),
    ]


@pytest.fixture(scope="module")
def demo_store(request, tmp_path_factory):
    """A store of either engine holding the demo stream, projected; made once per engine."""
    kind = request.param
    dropped = None
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('docs') / 'store.db'}"
    else:
        admin = request.getfixturevalue("pg_admin")
        name = f"wis_docs_{uuid.uuid4().hex[:12]}"
        url = create_database(PG_URL, name)
        dropped = (admin, name)
    engine = open_store(url)
    # What `workitem-store simulate --events 2000 --agents 5 --noise-rate 0.02 > stream.jsonl`
    # followed by `workitem-store import stream.jsonl` stores.
    import_lines(engine, simulate(2000, agents=5, noise_rate=0.02), source="file:stream.jsonl",
                 file_name="stream.jsonl")
    # And what `workitem-store ingest` records of agent-001 live: a session lost for a while,
    # the snapshot read when it came back.
    import_lines(engine, live_capture(), source="live", file_name="live.jsonl")
    runner.project(engine)
    if dropped:
        # `query` runs only as a role that can just read (on this database alone: no other
        # database of the shared cluster is touched).
        grant_readonly(engine, reader_of(engine), login=True, with_log=True, keep_connect=("*",))
    yield engine
    engine.dispose()
    if dropped:
        admin, name = dropped
        drop_database(PG_URL, name)  # (first: the role holds privileges on it)
        with admin.connect() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{reader_of(engine)}"'))


def reader_of(engine) -> str:
    """The grant-readonly role of a PostgreSQL demo store."""
    return f"{engine.url.database}_reader"


@pytest.mark.parametrize("demo_store, block", CASES, indirect=["demo_store"])
def test_sql_example_runs(demo_store, block: SqlBlock):
    # The text goes to the driver untouched, as an analyst's client would send it.
    raw = demo_store.raw_connection()
    try:
        cursor = raw.cursor()
        try:
            cursor.execute(block.sql)
        except Exception as exc:  # noqa: BLE001 - report which example failed, and how
            pytest.fail(f"docs/SQL.md line {block.line} ({block.heading}) fails on "
                        f"{demo_store.dialect.name}: {exc}\n{block.sql}")
        rows = cursor.fetchall()
        cursor.close()
    finally:
        raw.rollback()
        raw.close()
    if block.expect == "rows":
        assert rows, f"docs/SQL.md line {block.line} ({block.heading}) returns no rows on the demo data"
    elif block.expect == "none":
        assert not rows, f"docs/SQL.md line {block.line} ({block.heading}) should find nothing: {rows[:5]}"


@pytest.mark.parametrize("demo_store, block", CASES, indirect=["demo_store"])
def test_sql_example_runs_through_query_command(demo_store, block: SqlBlock):
    """SQL.md tells analysts to use `workitem-store query`: the examples must work there too."""
    from click.testing import CliRunner

    url = demo_store.url.render_as_string(hide_password=False)
    as_reader = ["--as", reader_of(demo_store)] if demo_store.dialect.name == "postgresql" else []
    result = CliRunner().invoke(cli_main, ["query", block.sql, "--json", "--db", url, *as_reader])
    assert result.exit_code == 0, (
        f"docs/SQL.md line {block.line} ({block.heading}) fails through `workitem-store query` on "
        f"{demo_store.dialect.name}: {result.output or result.exception!r}")


# -- (b) CLI.md --------------------------------------------------------------------------------

def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generator():
    return _load_script("gen_cli_docs")


def _all_commands(group: click.Group, prefix: str = "workitem-store") -> list[str]:
    names = []
    for name, command in group.commands.items():
        if command.hidden:
            continue
        names.append(f"{prefix} {name}")
        if isinstance(command, click.Group):
            names += _all_commands(command, f"{prefix} {name}")
    return names


def test_cli_md_is_generated():
    page = CLI_MD.read_text(encoding="utf-8")
    assert "generated by scripts/gen_cli_docs.py" in page.lower()
    assert page == _generator().render(cli_main), (
        "docs/CLI.md is out of date: run `.venv/bin/python scripts/gen_cli_docs.py`")


def test_cli_md_documents_every_command():
    page = CLI_MD.read_text(encoding="utf-8")
    commands = _all_commands(cli_main)
    assert commands
    for path in commands:
        assert f"\n## {path}\n" in page, f"{path} is not documented in docs/CLI.md"
        assert f"Usage: {path} " in page, f"docs/CLI.md lacks the --help of {path}"
    assert "Usage: workitem-store [OPTIONS] COMMAND" in page


def test_generator_is_deterministic_and_width_independent(monkeypatch):
    generator = _generator()
    monkeypatch.setenv("COLUMNS", "40")
    narrow = generator.render(cli_main)
    monkeypatch.setenv("COLUMNS", "300")
    assert generator.render(cli_main) == narrow


# -- (c) every table and column documented -----------------------------------------------------

def _table_sections(markdown: str) -> dict[str, str]:
    """``### `table``` heading -> the text up to the next heading of level 1 to 3."""
    sections: dict[str, str] = {}
    for match in re.finditer(r"^### `([a-z_]+)`[^\n]*\n(.*?)(?=^#{1,3} |\Z)", markdown, re.M | re.S):
        sections[match.group(1)] = match.group(2)
    return sections


def _documented_columns(section: str) -> list[str]:
    return re.findall(r"^\| `([a-z_0-9]+)` \|", section, re.M)


def _documented_relations():
    """Tables, then views (when the schema declares any)."""
    views = getattr(schema, "views_metadata", None)
    return list(metadata.sorted_tables) + (list(views.sorted_tables) if views is not None else [])


def test_every_table_and_column_is_documented():
    markdown = SQL_MD.read_text(encoding="utf-8")
    sections = _table_sections(markdown)
    relations = _documented_relations()
    assert {"event_log", "workitems"} <= {t.name for t in relations}
    for table in relations:
        assert table.name in sections, f"docs/SQL.md has no section ### `{table.name}`"
        documented = _documented_columns(sections[table.name])
        for column in table.columns:
            assert column.name in documented, f"docs/SQL.md does not document {table.name}.{column.name}"
        extra = set(documented) - {c.name for c in table.columns}
        assert not extra, f"docs/SQL.md documents columns {table.name} does not have: {sorted(extra)}"
        assert len(documented) == len(set(documented)), f"{table.name}: a column is documented twice"
    stale = set(sections) - {t.name for t in relations}
    assert not stale, f"docs/SQL.md documents tables or views the schema lacks: {sorted(stale)}"


def test_sql_md_names_each_writer():
    markdown = SQL_MD.read_text(encoding="utf-8")
    sections = _table_sections(markdown)
    writers = {
        "event_log": "store/log.py", "imported_files": "store/ingest/files.py",
        "workitems": "store/projections/workitems.py",
        "workitem_transitions": "store/projections/transitions.py",
        "capability_history": "store/projections/capabilities.py",
        "request_outcomes": "store/projections/requests.py",
        "projection_checkpoints": "store/projections/runner.py",
        "projection_errors": "store/projections/runner.py",
        "event_log_counts": "store/log.py",
        "seals": "store/seals.py", "store_identity": "migrations/versions/0006_seals.py",
        "redactions": "store/redaction.py",
    }
    assert set(writers) == set(metadata.tables)
    for table, module in writers.items():
        assert (ROOT / module).is_file()
        assert module in sections[table], f"docs/SQL.md does not say {module} writes {table}"


# -- (d) the hash chain as documented ----------------------------------------------------------

def documented_chain_hash(prev, seq, received_at, source, payload_sha256, duplicate_of, reason,
                          kind="notification", session=None):
    """The formula of docs/RULES.md, written out independently of store/log.py."""
    stamp = received_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fields = [prev, str(seq), stamp, source, payload_sha256,
              "" if duplicate_of is None else str(duplicate_of), reason or ""]
    if kind != "notification" or session is not None:
        fields += [kind, session or ""]
    return hashlib.sha256("\n".join(fields).encode("utf-8")).hexdigest()


def test_rules_md_states_the_chain_formula():
    rules = RULES_MD.read_text(encoding="utf-8")
    for needed in ("%Y-%m-%dT%H:%M:%S.%fZ", "0" * 64, "payload_sha256", "quarantine_reason", "duplicate_of"):
        assert needed in rules


def test_rules_md_worked_example():
    """The worked example's numbers in RULES.md are what the store computes."""
    from store.log import chain_hash, payload_sha256

    rules = RULES_MD.read_text(encoding="utf-8")
    example = re.search(r"<!-- worked example -->(.*?)<!-- end worked example -->", rules, re.S)
    assert example, "RULES.md lacks its worked hash example"
    body = example.group(1)
    payload = re.search(r"payload: `(.*?)`\n", body).group(1)
    digest = re.search(r"payload_sha256: `([0-9a-f]{64})`", body).group(1)
    link = re.search(r"chain_hash: `([0-9a-f]{64})`", body).group(1)
    at = dt.datetime(2026, 11, 2, 8, 0, 0, 123456, tzinfo=dt.UTC)
    assert payload_sha256(payload) == digest
    assert chain_hash("0" * 64, 1, at, "agent-001", digest, None, None) == link
    assert documented_chain_hash("0" * 64, 1, at, "agent-001", digest, None, None) == link


@pytest.mark.parametrize("demo_store", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
                         indirect=True)
def test_documented_formula_reproduces_the_chain(demo_store):
    c = event_log.c
    prev = "0" * 64
    with demo_store.connect() as conn:
        rows = conn.execute(select(c.seq, c.received_at, c.source, c.payload, c.payload_sha256,
                                   c.duplicate_of, c.quarantine_reason, c.kind, c.session, c.chain_hash)
                            .order_by(c.seq)).all()
    assert rows and [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert any(r.duplicate_of for r in rows) and any(r.quarantine_reason for r in rows)
    assert {r.kind for r in rows} == {"notification", "session", "snapshot"}
    for r in rows:
        assert hashlib.sha256(r.payload.encode("utf-8")).hexdigest() == r.payload_sha256
        prev_expected = documented_chain_hash(prev, r.seq, r.received_at, r.source, r.payload_sha256,
                                              r.duplicate_of, r.quarantine_reason, r.kind, r.session)
        assert prev_expected == r.chain_hash, f"seq {r.seq}"
        prev = r.chain_hash


# -- (e) datasette/metadata.json ----------------------------------------------------------------

def test_datasette_metadata_describes_every_table_view_and_column():
    import json

    described = json.loads((ROOT / "datasette" / "metadata.json").read_text())["databases"]["workitems"]["tables"]
    for table in [*metadata.sorted_tables, *schema.views_metadata.sorted_tables]:
        assert described[table.name]["description"], table.name
        assert set(described[table.name]["columns"]) == {c.name for c in table.columns}, table.name
        assert all(described[table.name]["columns"].values()), table.name


# -- (e) checking a seal with other tools, as RULES.md 9.5 shows it ----------------------------

def _seal_example() -> tuple[str, str, str, str]:
    """(KEYFILE.pub, the witness line, the sh block, the Python block) of RULES.md 9.5."""
    rules = RULES_MD.read_text(encoding="utf-8")
    example = rules[rules.index("<!-- seal example -->"):rules.index("<!-- end seal example -->")]
    public_key = re.search(r"-----BEGIN PUBLIC KEY-----\n.*?\n-----END PUBLIC KEY-----\n", example, re.S).group(0)
    line = re.search(r'^\{"format":"workitem-store-seal/1".*\}$', example, re.M).group(0)
    sh = re.search(r"```sh\n(.*?)```", example, re.S).group(1)
    section = rules[rules.index("### 9.5"):]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return public_key, line, sh, python


def test_rules_md_seal_example_verifies_with_openssl_and_python(tmp_path):
    public_key, line, sh, python = _seal_example()
    (tmp_path / "KEYFILE.pub").write_text(public_key)
    (tmp_path / "seals.jsonl").write_text(line + "\n")
    from store.seals import Seal, load_public_key
    assert Seal.from_line(line).signed_by(load_public_key(tmp_path / "KEYFILE.pub"))  # the store agrees
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", sh], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected = [comment.lstrip("# ").split()[0] for comment in sh.splitlines() if comment.startswith("# ")]
    for value in expected:  # "Signature", the key_id and the digest the example shows
        assert value in done.stdout, (value, done.stdout)
    done = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "signed, linked" in done.stdout, done.stderr
    # One changed field: openssl refuses the signature.
    (tmp_path / "message.bin").write_bytes((tmp_path / "message.bin").read_bytes().replace(b"\n500\n", b"\n501\n", 1))
    refused = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "KEYFILE.pub", "-rawin",
                              "-in", "message.bin", "-sigfile", "sig.bin"], cwd=tmp_path, capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "Verification Failure" in refused.stdout + refused.stderr
