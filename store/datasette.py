"""Datasette metadata for any SQLite store file, generated from docs/SQL.md.

Datasette names a database after its file's stem (``other-name.db`` is ``other-name``) and
applies a metadata file's entries by that name, so the metadata is made for one file:
``metadata(db_path)``.  Everything in it comes from docs/SQL.md, so the two never disagree:
each table and view ("### `name`" sections with a column table) with its first paragraph as
description and each column's "meaning" cell, and as canned queries the examples of its
section "Example queries" that run on SQLite.  Then::

    datasette workitems.db -m metadata.json

``datasette/metadata.json`` in the repository is this metadata for ``workitems.db``.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from .errors import StoreError, safe_url
from .output import atomic_output

SQL_MD = Path(__file__).resolve().parent.parent / "docs" / "SQL.md"
EXAMPLES_HEADING = "## Example queries"
ENGINES = ("sqlite", "postgresql")

_TABLE_HEADING = re.compile(r"^### `(\w+)`( \(view\))?\s*$")
_FENCE = re.compile(r"^```(\S*)[ \t]*(.*)$")


@dataclass(frozen=True)
class Example:
    """One ```sql block of docs/SQL.md's "Example queries"."""

    heading: str  # the ### heading it is under
    intro: str  # the paragraph right before it ('' when a block or heading precedes it)
    sql: str
    engines: tuple[str, ...]  # ("sqlite", "postgresql") for a portable block
    line: int  # where its fence is, 1-based


def read_docs(path: Path = SQL_MD) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StoreError(f"{path} not found: the Datasette metadata is made from docs/SQL.md of a "
                         "workitem-store checkout") from None


def _plain(markdown: str) -> str:
    return re.sub(r"\s+", " ", markdown.replace("`", "")).strip()


def tables_from_docs(markdown: str) -> dict[str, dict]:
    """Every documented table and view: its description and its columns' meanings."""
    tables: dict[str, dict] = {}
    for section in re.split(r"(?m)^(?=#{2,3} )", markdown):
        lines = section.splitlines()
        match = _TABLE_HEADING.match(lines[0]) if lines else None
        if not match:
            continue
        body = "\n".join(lines[1:]).strip()
        columns = {}
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 4 and cells[0].startswith("`") and cells[0].endswith("`"):
                columns[cells[0].strip("`")] = _plain(cells[3])
        if columns:
            tables[match.group(1)] = {"description": _plain(body.split("\n\n")[0]), "columns": columns}
    return tables


def examples(markdown: str) -> list[Example]:
    """The ```sql blocks of the section "Example queries", in order."""
    lines = markdown.splitlines()
    found: list[Example] = []
    in_examples, heading = False, ""
    paragraph: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            in_examples = line.strip() == EXAMPLES_HEADING
        if line.startswith("#"):
            heading, paragraph = line.lstrip("#").strip(), []
        fence = _FENCE.match(line)
        if fence:
            start, body = i, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            info, variant = fence.group(1), fence.group(2).split()
            if in_examples and info == "sql":
                engines = tuple(variant) if variant else ENGINES
                if not set(engines) <= set(ENGINES):
                    raise ValueError(f"docs/SQL.md line {start + 1}: unknown sql block variant {variant!r}")
                found.append(Example(heading, _plain(" ".join(paragraph)), "\n".join(body).strip(),
                                     engines, start + 1))
            paragraph = []
        elif not line.strip():
            pass
        elif line.lstrip().startswith("<!--"):
            pass  # a test marker between a paragraph and its block
        elif not line.startswith("#"):
            if i > 0 and not lines[i - 1].strip():
                paragraph = []
            paragraph.append(line)
        i += 1
    return found


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _title(example: Example, n: int) -> str:
    """The heading for the first example under it; for the others, what their paragraph says."""
    clause = re.split(r"[:(]", example.intro, maxsplit=1)[0].strip(" ,.")
    if n == 1 or not clause or len(clause) > 80:
        return example.heading if n == 1 else f"{example.heading} ({n})"
    return clause[0].upper() + clause[1:]


def canned_queries(markdown: str) -> dict[str, dict]:
    """The examples that run on SQLite, as Datasette canned queries named after their heading."""
    queries: dict[str, dict] = {}
    per_heading: dict[str, int] = {}
    for example in examples(markdown):
        n = per_heading[example.heading] = per_heading.get(example.heading, 0) + 1
        if "sqlite" not in example.engines:
            continue
        name = _slug(example.heading) if n == 1 else f"{_slug(example.heading)}_{n}"
        query = {"title": _title(example, n), "sql": example.sql}
        if example.intro:
            query["description"] = example.intro
        queries[name] = query
    return queries


def store_file(db_path: str | Path) -> str:
    """The SQLite file of ``db_path`` (a path or a ``sqlite:///`` URL); a StoreError for any other URL."""
    value = str(db_path)
    if "://" in value:
        url = make_url(value)
        if not url.drivername.startswith("sqlite") or not url.database or url.database == ":memory:":
            raise StoreError(f"Datasette reads SQLite files; {safe_url(url)} is not one")
        value = url.database
    return value


def database_name(db_path: str | Path) -> str:
    """The name Datasette gives the database of a SQLite file (or ``sqlite:///`` URL): its stem."""
    return Path(store_file(db_path)).stem


def metadata(db_path: str | Path, docs: Path = SQL_MD) -> dict:
    """Datasette metadata for the store file ``db_path``: tables, views, columns, canned queries."""
    markdown = read_docs(docs)
    return {
        "title": "workitem-store",
        "description": "Genesys Web Services workitem notifications: the append-only event_log "
                       "and the projections derived from it (docs/SQL.md).",
        "databases": {database_name(db_path): {
            "tables": tables_from_docs(markdown),
            "queries": canned_queries(markdown),
        }},
    }


def render(db_path: str | Path, docs: Path = SQL_MD) -> str:
    return json.dumps(metadata(db_path, docs), indent=2, ensure_ascii=False) + "\n"


def write_metadata(db_path: str | Path, out_path: str | Path, docs: Path = SQL_MD) -> Path:
    """Write the metadata of ``db_path`` to ``out_path`` (replaced whole); returns ``out_path``."""
    with atomic_output(str(out_path)) as out:
        out.write(render(db_path, docs))
    return Path(out_path)


def command_line(db_path: str | Path, metadata_path: str | Path) -> str:
    """The shell command that browses ``db_path`` with the metadata at ``metadata_path``."""
    return shlex.join(["datasette", store_file(db_path), "-m", str(metadata_path)])
