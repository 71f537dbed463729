"""Generate datasette/metadata.json from docs/SQL.md, so the two never disagree.

    .venv/bin/python scripts/gen_datasette_metadata.py           # rewrite datasette/metadata.json
    .venv/bin/python scripts/gen_datasette_metadata.py --check   # exit 1 if it is out of date

Every table and view of docs/SQL.md ("### `name`" sections with a column table) becomes a
Datasette table entry: its first paragraph as description, each column's "meaning" cell as the
column description.  A few canned queries come from the demo.  Use it with

    datasette workitems.db -m datasette/metadata.json

(Datasette names a database after its file: the entries apply to a file called workitems.db.)
tests/test_docs.py fails when the committed file differs from this script's output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from store.cli import DEMO_QUERIES  # noqa: E402

SQL_MD = ROOT / "docs" / "SQL.md"
OUTPUT = ROOT / "datasette" / "metadata.json"
DATABASE = "workitems"
_HEADING = re.compile(r"^### `(\w+)`( \(view\))?\s*$")


def _plain(markdown: str) -> str:
    return re.sub(r"\s+", " ", markdown.replace("`", "")).strip()


def tables_from_docs(text: str) -> dict[str, dict]:
    tables: dict[str, dict] = {}
    sections = re.split(r"(?m)^(?=#{2,3} )", text)
    for section in sections:
        lines = section.splitlines()
        match = _HEADING.match(lines[0]) if lines else None
        if not match:
            continue
        body = "\n".join(lines[1:]).strip()
        columns = {}
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 4 and cells[0].startswith("`") and cells[0].endswith("`"):
                columns[cells[0].strip("`")] = _plain(cells[3])
        if not columns:
            continue
        paragraph = body.split("\n\n")[0]
        tables[match.group(1)] = {"description": _plain(paragraph), "columns": columns}
    return tables


def metadata() -> dict:
    return {
        "title": "workitem-store",
        "description": "Genesys Web Services workitem notifications: the append-only event_log "
                       "and the projections derived from it (docs/SQL.md).",
        "databases": {DATABASE: {
            "tables": tables_from_docs(SQL_MD.read_text(encoding="utf-8")),
            "queries": {re.sub(r"\W+", "_", title).strip("_"): {"title": title, "sql": sql}
                        for title, sql in DEMO_QUERIES.items()},
        }},
    }


def render() -> str:
    return json.dumps(metadata(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args()
    if args.check:
        if OUTPUT.read_text(encoding="utf-8") != render():
            print(f"{OUTPUT} is out of date: run scripts/gen_datasette_metadata.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(render(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
