"""How results are shown: JSON, CSV or a table, with one timestamp form and NULL shown as NULL.

Every instant printed, in any format, is ISO 8601 UTC with ``Z`` and microseconds
(``2026-11-02T08:00:00.123456Z``: ``notifications.utc_text``, the form of the envelopes and of
the hash chain).  In tables NULL is ``NULL``, apart from an empty list ``[]`` or text; JSON keeps
null; CSV has no NULL (an empty cell).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
from typing import Any

import click
from tabulate import tabulate

from .. import output
from ..notifications import utc_text
from ..seals import Seal

NULL = "NULL"


def json_default(value: Any) -> str:
    """What JSON cannot hold as it is: an instant in the one form, anything else as text."""
    return utc_text(value) if isinstance(value, dt.datetime) else str(value)


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=json_default))


def compact(value: Any) -> str | None:
    """A JSON value (dict, list) as one line of JSON text; None stays None (NULL)."""
    if value is None:
        return None
    return json.dumps(value, default=json_default, ensure_ascii=False)


def cell(value: Any) -> Any:
    """A value for a table cell: text with control characters escaped, an instant in the one
    form, JSON values as JSON text; numbers as they are, None for tabulate's NULL."""
    if isinstance(value, dt.datetime):
        return utc_text(value)
    if isinstance(value, dict | list):
        value = compact(value)
    return output.safe_text(value) if isinstance(value, str) else value


def table(rows: list[dict] | list[tuple], headers) -> str:
    """A table for reading on a terminal (control characters shown escaped, NULL as NULL)."""
    cells = [[cell(v) for v in (row.values() if isinstance(row, dict) else row)] for row in rows]
    return tabulate(cells, headers=[output.safe_text(h) for h in headers], missingval=NULL)


def _csv_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return utc_text(value)
    if isinstance(value, dict | list):
        return json.dumps(value, default=json_default)
    return value


def output_format(fmt: str | None, raw_csv: bool) -> str | None:
    """The format of --json/--csv/--raw-csv (None: a table); a usage error for two at once.
    Called first, before anything is read."""
    if raw_csv and fmt == "json":
        raise click.UsageError("--raw-csv is for CSV output, not --json")
    return "csv" if raw_csv else fmt


def emit_rows(rows: list[dict], fmt: str | None, table_rows: list[dict] | None = None,
              columns: list[str] | None = None, raw_csv: bool = False) -> None:
    """``rows`` as JSON, CSV (formula-like cells neutralised unless ``raw_csv``), or (default)
    a table of ``table_rows`` (default: ``rows``); ``columns``: the header, also without rows.
    ``fmt`` as ``output_format`` gives it."""
    header = columns or (list(rows[0]) if rows else [])
    if fmt == "json":
        echo_json(rows)
    elif fmt == "csv":
        neutral = (lambda v: v) if raw_csv else output.csv_cell
        writer = csv.writer(sys.stdout)
        writer.writerow([neutral(k) for k in header])
        for row in rows:
            writer.writerow([neutral(_csv_value(row.get(k))) for k in header])
    else:
        shown = table_rows if table_rows is not None else rows
        click.echo(table(shown, list(shown[0]) if shown else header))


CSV_HELP = ("Print CSV.  A text cell starting with =, +, -, @, tab or carriage return gets a ' in front "
            "(OWASP rule against spreadsheet formula injection); numbers are left as they are.")
RAW_CSV_HELP = "Print CSV with every cell as stored, without that ' (implies --csv)."


def raw_csv_option(command):
    return click.option("--raw-csv", is_flag=True, help=RAW_CSV_HELP)(command)


def output_options(command):
    """--json, --csv and --raw-csv (a table when none is given)."""
    command = raw_csv_option(command)
    command = click.option("--csv", "fmt", flag_value="csv", help=CSV_HELP)(command)
    command = click.option("--json", "fmt", flag_value="json", help="Print JSON.")(command)
    return command


def say(line: str) -> None:
    """One line of text made of stored values: control characters shown escaped."""
    click.echo(output.safe_text(line))


def seal_line(made: Seal) -> str:
    where = "the seals table and the witness file" if made.witnessed else "the seals table"
    return (f"sealed: seal {made.n}, seq {made.seq}, chain_hash {made.chain_hash}, {made.sealed_at} "
            f"(in {where})")
