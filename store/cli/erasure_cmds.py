"""Erasure: ``forget``, the redaction of userData values in the log (store/redaction.py)."""

from __future__ import annotations

import datetime as dt
import re

import click

from .. import output, redaction
from ..errors import StoreError
from .common import TIMESTAMP, TIMESTAMP_FORMS, UTF8_TEXT, db_option, writer_engine
from .formatting import echo_json, say, table

_DURATION = re.compile(r"(\d+)([dhm])")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}
SHOWN = 20  # workitems named in the summary line (all of them with --json)


class Before(click.ParamType):
    """An instant (the CLI's timestamp forms) or a duration ``90d``, ``12h``, ``30m`` back from now."""

    name = "timestamp|duration"

    def convert(self, value, param, ctx):
        if isinstance(value, dt.datetime):
            return value
        match = _DURATION.fullmatch(value.strip().lower())
        if match is None:
            if re.fullmatch(r"\s*\d+\s*", value):
                self.fail(f"{value!r}: give a unit (90d, 12h, 30m) or {TIMESTAMP_FORMS}", param, ctx)
            return TIMESTAMP.convert(value, param, ctx)
        try:
            return dt.datetime.now(dt.UTC) - dt.timedelta(**{_UNITS[match[2]]: int(match[1])})
        except OverflowError:
            self.fail(f"{value!r} reaches before year 1", param, ctx)


class UserData(click.ParamType):
    name = "KEY=VALUE"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        key, sep, text = UTF8_TEXT.convert(value, param, ctx).partition("=")
        if not sep or not key or not text:
            self.fail(f"{output.safe_text(value)!r} is not KEY=VALUE (both not empty)", param, ctx)
        return key, text


@click.command()
@click.option("--workitem", "workitems", multiple=True, type=UTF8_TEXT, metavar="WID",
              help="Rows of this workitem (its notifications, and the snapshots that list it); repeatable.")
@click.option("--user-data", type=UserData(), metavar="KEY=VALUE",
              help="Rows with a userData (of a notification, or of any workitem of a snapshot) whose KEY holds "
                   "VALUE (compared as text).")
@click.option("--received-before", type=Before(), metavar="TS|DURATION",
              help="Rows received before this instant, or before now minus a duration: 90d, 12h, 30m.")
@click.option("--keys", metavar="K1,K2", type=UTF8_TEXT,
              help="The userData keys whose values to redact (default: every key of each userData).")
@click.option("--reason", required=True, type=UTF8_TEXT, help="Why (recorded with each redaction); required.")
@click.option("--dry-run", is_flag=True, help="List the rows that would change (seq, workitems, keys); change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@db_option
def forget(workitems, user_data, received_before, keys, reason, dry_run, as_json):
    """Erase userData values from the log: in each selected row, the value of each chosen key of
    every userData object becomes "[REDACTED]" (the key stays), and the change is recorded in
    the append-only table redactions (seq, time, reason, keys, SHA-256 of the new payload, who).

    The selections given all apply (at least one is needed).  payload_sha256 and chain_hash
    keep their values: the chain and the seals still verify (verify checks each redacted
    payload against its records).  workitems.user_data of the workitems concerned is then
    recomputed from the redacted log; history and state --as-of show the marker.

    Safe to run again, and from cron: rows already redacted are counted, not changed.  Commits
    every 2,000 rows: an interrupted run leaves whole rows, and the next run finishes.

    \b
    Example:
      workitem-store forget --user-data Customer=C5947 --reason "erasure request 2026-117"
      workitem-store forget --received-before 90d --reason retention
      workitem-store forget --workitem 0001abc --keys Phone,Email --reason "case closed" --dry-run
    """
    wanted = None if keys is None else sorted({k.strip() for k in keys.split(",") if k.strip()})
    if wanted == []:
        raise click.BadParameter("give at least one key", param_hint="--keys")
    if not reason.strip():
        raise click.BadParameter("the reason must not be empty", param_hint="--reason")
    try:
        selection = redaction.Selection(tuple(workitems), user_data, received_before)
    except StoreError as exc:
        raise click.UsageError(str(exc)) from exc
    engine = writer_engine()
    try:
        result = redaction.forget(engine, selection, reason, wanted, dry_run=dry_run)
    finally:
        engine.dispose()
    refreshed = sorted(result.workitems)
    if as_json:
        echo_json({"dry_run": dry_run, "redacted": 0 if dry_run else result.redacted,
                   "would_redact": len(result.planned) if dry_run else None,
                   "already_redacted": result.already, "workitems_refreshed": refreshed,
                   "wal_cleared": result.wal_cleared,
                   "rows": result.planned if dry_run else None})
        return
    if dry_run:
        if result.planned:
            rows = [(p["seq"], p["kind"], ", ".join(p["workitems"]), ", ".join(p["keys"])) for p in result.planned]
            click.echo(table(rows, ["seq", "kind", "workitems", "keys"]))
        say(f"dry run: {len(result.planned):,} rows would be redacted, {result.already:,} already are; "
            "nothing changed")
        return
    named = ", ".join(output.safe_text(w) for w in refreshed[:SHOWN]) + (", ..." if len(refreshed) > SHOWN else "")
    say(f"forget: {result.redacted:,} rows redacted, {result.already:,} already redacted; "
        f"{len(refreshed):,} workitems refreshed" + (f": {named}" if refreshed else ""))
    if result.wal_cleared is False:
        say("note: a reader kept the SQLite WAL, which may still hold the old values: run "
            "`sqlite3 FILE 'PRAGMA wal_checkpoint(TRUNCATE)'` when no one reads (docs/RULES.md 11.1)")
