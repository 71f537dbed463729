"""The analysts' SQL: the view workitem_summary, the percentile recipes of docs/SQL.md, Datasette.

(a) workitem_summary answers the per-workitem questions as docs/SQL.md defines them, with the
    same rows on SQLite and PostgreSQL for the same notifications.
(b) The percentile recipes ("Percentiles (p50, p90) on both engines") return the same numbers
    on both engines, the numbers Python computes from the same values, and on PostgreSQL the
    numbers of percentile_disc / percentile_cont.
(c) store.datasette makes metadata for any store file, whose canned queries (docs/SQL.md's
    examples) run on a real store file; datasette/metadata.json is that metadata for workitems.db.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
from helpers import at, bayeux, data, envelope, feed, fresh_store, run
from sqlalchemy import inspect, text

from store import datasette
from store.db import open_store
from store.errors import StoreError
from store.ingest.files import import_lines
from store.projections import runner
from store.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent
VIEWS = {"workitem_state_durations", "request_outcome_summary", "capability_timeline", "notifications",
         "ingest_gaps", "workitem_summary"}
PERCENTILES = "Percentiles (p50, p90) on both engines"
INVITED_CAPS = ["Accept", "Reject"]
PROCESSING_CAPS = ["Transfer", "Complete"]


# -- stores ------------------------------------------------------------------------------------

def _line(n: int, source: str, seconds: float, ntype: str = "StatusChange", wid: str = "w1", **fields) -> str:
    return envelope(bayeux(data(ntype, wid, **fields), mid=str(n)), source, at(seconds))


def lives() -> list[str]:
    """Workitem lives with every case workitem_summary distinguishes, times in seconds."""
    steps = [
        # w1: rejected at agent a, transferred by b, completed by c
        ("a", 0, "w1", "Invited", INVITED_CAPS), ("a", 5, "w1", "Completed", []),
        ("b", 7, "w1", "Invited", INVITED_CAPS), ("b", 10, "w1", "Processing", PROCESSING_CAPS),
        ("b", 20, "w1", "Revoked", []), ("c", 21, "w1", "Invited", INVITED_CAPS),
        ("c", 25, "w1", "Processing", PROCESSING_CAPS), ("c", 40, "w1", "Completed", []),
        # w2: an offer withdrawn before anyone accepted it: revoked, not transferred
        ("a", 1, "w2", "Invited", INVITED_CAPS), ("a", 3, "w2", "Revoked", []),
        # w3: first seen in Processing (no invitation seen), completed
        ("b", 1, "w3", "Processing", PROCESSING_CAPS), ("b", 2.5, "w3", "Completed", []),
        # w5: microseconds
        ("a", 0.000001, "w5", "Invited", INVITED_CAPS), ("a", 1.999999, "w5", "Processing", PROCESSING_CAPS),
        # w6: completed into a queue, invited and completed again: not a rejection
        ("a", 2, "w6", "Invited", INVITED_CAPS), ("a", 4, "w6", "Processing", PROCESSING_CAPS),
        ("a", 9, "w6", "Completed", []), ("b", 30, "w6", "Invited", INVITED_CAPS),
        ("b", 31, "w6", "Processing", PROCESSING_CAPS), ("b", 33.5, "w6", "Completed", []),
    ]
    lines = [_line(n, source, seconds, wid=wid, state=state, caps=caps)
             for n, (source, seconds, wid, state, caps) in enumerate(steps)]
    # w4: only an Error names it; w5 also gets a PropertiesUpdated (no state change)
    lines.append(_line(100, "a", 3, "Error", wid="w4", ref=1, code=404, message="gone"))
    lines.append(_line(101, "a", 2.5, "PropertiesUpdated", wid="w5", state="Processing", caps=PROCESSING_CAPS))
    return lines


EXPECTED = {  # workitem -> what workitem_summary must say (timestamps as seconds from at(0))
    "w1": dict(final_state="Completed", source="c", first_seen_at=0, invited_at=0, accepted_at=10,
               completed_at=40, last_seen_at=40, rejected=True, rejections=1, transfers=1, revocations=1,
               time_to_accept_seconds=10.0, handling_seconds=25.0, notification_count=8, error_count=0),
    "w2": dict(final_state="Revoked", source="a", first_seen_at=1, invited_at=1, accepted_at=None,
               completed_at=None, last_seen_at=3, rejected=False, rejections=0, transfers=0, revocations=1,
               time_to_accept_seconds=None, handling_seconds=None, notification_count=2, error_count=0),
    "w3": dict(final_state="Completed", source="b", first_seen_at=1, invited_at=None, accepted_at=None,
               completed_at=2.5, last_seen_at=2.5, rejected=False, rejections=0, transfers=0, revocations=0,
               time_to_accept_seconds=None, handling_seconds=1.5, notification_count=2, error_count=0),
    "w4": dict(final_state=None, source=None, first_seen_at=3, invited_at=None, accepted_at=None,
               completed_at=None, last_seen_at=3, rejected=False, rejections=0, transfers=0, revocations=0,
               time_to_accept_seconds=None, handling_seconds=None, notification_count=1, error_count=1),
    "w5": dict(final_state="Processing", source="a", first_seen_at=0.000001, invited_at=0.000001,
               accepted_at=1.999999, completed_at=None, last_seen_at=2.5, rejected=False, rejections=0,
               transfers=0, revocations=0, time_to_accept_seconds=1999998 / 1e6, handling_seconds=None,
               notification_count=3, error_count=0),
    "w6": dict(final_state="Completed", source="b", first_seen_at=2, invited_at=2, accepted_at=4,
               completed_at=33.5, last_seen_at=33.5, rejected=False, rejections=0, transfers=0, revocations=0,
               time_to_accept_seconds=2.0, handling_seconds=7.5, notification_count=6, error_count=0),
}
TIMESTAMPS = ("first_seen_at", "invited_at", "accepted_at", "completed_at", "last_seen_at")


def _stamp(value) -> str | None:
    """A timestamp as both engines' rows give it, in SQLite's stored form."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def _plain(value):
    """One engine-independent value: Decimal as float, a boolean as 1/0 (SQLite has no boolean)."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bool):
        return int(value)
    return _stamp(value)


def _query(engine, sql: str) -> list[tuple]:
    """The rows of ``sql`` sent to the driver untouched, as an analyst's client would."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(sql)
        rows = [tuple(_plain(v) for v in row) for row in cursor.fetchall()]
        cursor.close()
        return rows
    finally:
        raw.rollback()
        raw.close()


def _summary(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["workitem_id"]: {k: _stamp(v) for k, v in r.items()}
                for r in conn.execute(text("SELECT * FROM workitem_summary ORDER BY workitem_id")).mappings()}


@pytest.fixture(scope="module")
def stores(request):
    """The same notifications in a SQLite store and a PostgreSQL store: (sqlite, postgresql)."""
    def fill(engine) -> None:
        if request.param == "lives":
            feed(engine, lives())
        else:
            import_lines(engine, simulate(2000, agents=5, noise_rate=0.02), source="file:stream.jsonl",
                         file_name="stream.jsonl")
        runner.project(engine)

    with fresh_store("sqlite") as sqlite_engine:
        fill(sqlite_engine)
        request.getfixturevalue("pg_admin")
        with fresh_store("postgresql") as pg_engine:
            fill(pg_engine)
            yield sqlite_engine, pg_engine


BOTH = pytest.mark.parametrize("stores", [pytest.param("lives", marks=pytest.mark.postgres),
                                          pytest.param("demo", marks=pytest.mark.postgres)], indirect=True)


# -- (a) workitem_summary ----------------------------------------------------------------------

@pytest.mark.parametrize("stores", [pytest.param("lives", marks=pytest.mark.postgres)], indirect=True)
def test_workitem_summary_answers_as_documented(stores):
    for engine in stores:
        summary = _summary(engine)
        assert set(summary) == set(EXPECTED), engine.dialect.name
        for wid, expected in EXPECTED.items():
            want = {k: (_stamp(at(v)) if k in TIMESTAMPS and v is not None else v) for k, v in expected.items()}
            got = {k: v for k, v in summary[wid].items() if k != "workitem_id"}
            got["rejected"] = bool(got["rejected"])
            assert got == want, (engine.dialect.name, wid)


@BOTH
def test_workitem_summary_is_the_same_on_both_engines(stores):
    sqlite_engine, pg_engine = stores
    sql = "SELECT * FROM workitem_summary ORDER BY workitem_id"
    rows = _query(sqlite_engine, sql)
    assert rows and rows == _query(pg_engine, sql)
    # The demo stream has rejections and transfers: the comparison covers them.
    if len(rows) > 100:
        columns = [c["name"] for c in inspect(sqlite_engine).get_columns("workitem_summary")]
        summary = [dict(zip(columns, r, strict=True)) for r in rows]
        assert any(r["rejected"] for r in summary) and any(r["transfers"] for r in summary)
        assert all(r["time_to_accept_seconds"] is None or r["time_to_accept_seconds"] >= 0 for r in summary)


def test_every_view_is_at_head(engine):
    assert set(inspect(engine).get_view_names()) == VIEWS


# -- (b) percentile recipes --------------------------------------------------------------------

def _recipes() -> list[datasette.Example]:
    found = [e for e in datasette.examples(datasette.read_docs()) if e.heading == PERCENTILES]
    assert len(found) >= 4, f"docs/SQL.md has no section {PERCENTILES!r} with its recipes"
    return found


def _nearest_rank(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(p * len(ordered) / 100) - 1]


def _interpolated(values: list[float], p: int) -> float:
    ordered = sorted(values)
    k, rest = divmod(p * (len(ordered) - 1), 100)
    upper = ordered[min(k + 1, len(ordered) - 1)]
    return ordered[k] + (upper - ordered[k]) * rest / 100


def _measures(engine) -> dict[str, list[float]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT time_to_accept_seconds, handling_seconds FROM workitem_summary")).all()
    return {"time to accept": [r[0] for r in rows if r[0] is not None],
            "handling time": [r[1] for r in rows if r[1] is not None]}


@BOTH
def test_portable_percentile_recipes_give_the_same_numbers_on_both_engines(stores):
    sqlite_engine, pg_engine = stores
    portable = [e for e in _recipes() if e.engines == datasette.ENGINES]
    assert len(portable) >= 3
    for example in portable:
        rows = _query(sqlite_engine, example.sql)
        assert rows, f"docs/SQL.md line {example.line} returns nothing"
        assert rows == _query(pg_engine, example.sql), f"docs/SQL.md line {example.line} differs between engines"


@BOTH
def test_percentile_recipes_compute_the_percentiles(stores):
    """The recipes' numbers are the percentiles of the values, as Python computes them."""
    sqlite_engine, pg_engine = stores
    measures = _measures(sqlite_engine)
    recipes = _recipes()
    nearest = next(e for e in recipes if e.engines == datasette.ENGINES and "rn * 100 >= 50 * n" in e.sql
                   and "measure" in e.sql)
    interpolated = next(e for e in recipes if e.engines == datasette.ENGINES and "hi50" in e.sql)
    for engine in stores:
        for measure, workitems, p50, p90, *_ in _query(engine, nearest.sql):
            values = measures[measure]
            assert (workitems, p50, p90) == (len(values), _nearest_rank(values, 50), _nearest_rank(values, 90))
        for measure, workitems, p50, p90 in _query(engine, interpolated.sql):
            values = measures[measure]
            assert workitems == len(values)
            assert p50 == pytest.approx(_interpolated(values, 50), rel=1e-12)
            assert p90 == pytest.approx(_interpolated(values, 90), rel=1e-12)
    # PostgreSQL's own functions agree: percentile_disc exactly, percentile_cont to the last bits.
    by_function = {name: next(e for e in recipes if e.engines == ("postgresql",) and name in e.sql)
                   for name in ("percentile_disc", "percentile_cont")}
    assert _query(pg_engine, by_function["percentile_disc"].sql) == _query(pg_engine, nearest.sql)
    own = _query(pg_engine, by_function["percentile_cont"].sql)
    ours = _query(pg_engine, interpolated.sql)
    assert [r[:2] for r in own] == [r[:2] for r in ours]
    for a, b in zip(own, ours, strict=True):
        assert a[2:] == pytest.approx(b[2:], rel=1e-12)


# -- (c) Datasette -----------------------------------------------------------------------------

def test_datasette_metadata_names_any_file():
    for path in ("other-name.db", "/some/dir/other-name.db", Path("other-name.db"), "sqlite:////tmp/other-name.db"):
        assert list(datasette.metadata(path)["databases"]) == ["other-name"], path
    with pytest.raises(StoreError, match="Datasette reads SQLite files; postgresql://u:\\*\\*\\*@h/db is not one"):
        datasette.metadata("postgresql://u:secret@h/db")


def test_datasette_metadata_describes_every_documented_relation_and_example():
    described = datasette.metadata("x.db")["databases"]["x"]
    markdown = datasette.read_docs()
    assert {"event_log", "workitems", "workitem_summary"} <= set(described["tables"])
    assert set(described["tables"]["workitem_summary"]["columns"]) >= {
        "first_seen_at", "accepted_at", "completed_at", "final_state", "rejected", "transfers",
        "time_to_accept_seconds", "handling_seconds"}
    on_sqlite = [e for e in datasette.examples(markdown) if "sqlite" in e.engines]
    queries = described["queries"]
    assert len(queries) == len(on_sqlite) >= 20
    assert [q["sql"] for q in queries.values()] == [e.sql for e in on_sqlite]
    assert all(q["title"] for q in queries.values())
    assert any(e.heading == PERCENTILES for e in on_sqlite)


def test_canned_queries_run_on_a_store_file(tmp_path):
    db = tmp_path / "other-name.db"
    engine = open_store(f"sqlite:///{db}")
    import_lines(engine, simulate(500, agents=3, noise_rate=0.02), source="file:s.jsonl", file_name="s.jsonl")
    runner.project(engine)
    engine.dispose()
    out = datasette.write_metadata(db, tmp_path / "metadata.json")
    metadata = json.loads(out.read_text(encoding="utf-8"))
    queries = metadata["databases"]["other-name"]["queries"]
    assert queries
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # as Datasette opens it: read-only
    try:
        for name, query in queries.items():
            try:
                conn.execute(query["sql"]).fetchall()
            except sqlite3.Error as exc:
                pytest.fail(f"canned query {name} fails on a store file: {exc}\n{query['sql']}")
    finally:
        conn.close()
    assert datasette.command_line(db, out) == f"datasette {db} -m {out}"
    assert not list(tmp_path.glob("*.partial"))


def test_committed_metadata_is_generated():
    committed = (ROOT / "datasette" / "metadata.json").read_text(encoding="utf-8")
    assert committed == datasette.render("workitems.db"), (
        "datasette/metadata.json is out of date: run `.venv/bin/python -c \"from store.datasette import "
        "write_metadata; write_metadata('workitems.db', 'datasette/metadata.json')\"`")


def test_metadata_without_docs_is_an_error(tmp_path):
    with pytest.raises(StoreError, match="SQL.md not found"):
        datasette.metadata("x.db", docs=tmp_path / "SQL.md")


def test_datasette_command_writes_metadata_named_after_the_store_file(tmp_path, monkeypatch):
    """`workitem-store datasette`: metadata keyed by the file's stem, the command to run printed;
    a missing store is an error that creates nothing; an existing output is never a store."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "calls-2026.db"
    missing = run("datasette", "--db", db, ok=False)
    assert missing.exit_code == 1 and "no store at" in missing.output and not db.exists()
    run("init", "--db", db)
    out = run("datasette", "--db", db).output
    assert out.strip() == f"datasette {db} -m calls-2026-metadata.json"
    written = json.loads((tmp_path / "calls-2026-metadata.json").read_text(encoding="utf-8"))
    assert list(written["databases"]) == ["calls-2026"]
    refused = run("datasette", "--db", db, "-o", db, ok=False)
    assert refused.exit_code == 1 and db.stat().st_size > 0
    assert "Datasette reads SQLite files" in run("datasette", "--db", "postgresql://u@h/d", ok=False).output
