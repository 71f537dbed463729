"""The tools the README points SQLite users to work on a store as documented (sqlite-utils)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

from store.db import open_store
from store.ingest.files import import_lines
from store.projections import runner
from store.simulate import simulate

SQLITE_UTILS = str(Path(sys.executable).with_name("sqlite-utils"))


def _store(tmp_path) -> Path:
    path = tmp_path / "workitems.db"
    engine = open_store(str(path))
    import_lines(engine, simulate(500, agents=3, seed=5), source="t")
    runner.project(engine)
    engine.dispose()
    return path


def test_sqlite_utils_exports_tables_and_queries(tmp_path):
    path = _store(tmp_path)
    rows = list(csv.DictReader(io.StringIO(subprocess.run(
        [SQLITE_UTILS, "rows", str(path), "workitems", "--csv"], check=True, capture_output=True, text=True).stdout)))
    assert rows and set(rows[0]) >= {"workitem_id", "state", "capabilities", "first_seq"}
    summary = json.loads(subprocess.run(
        [SQLITE_UTILS, "query", str(path),
         "SELECT source, SUM(requests) AS n FROM request_outcome_summary GROUP BY source"],
        check=True, capture_output=True, text=True).stdout)
    assert {row["source"] for row in summary} == {"agent-001", "agent-002", "agent-003"}
    assert all(row["n"] > 0 for row in summary)
