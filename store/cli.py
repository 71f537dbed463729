"""The ``workitem-store`` command line: parse arguments, call library functions, format results."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import sys
from pathlib import Path

import click
from tqdm import tqdm

from . import db, export, status as status_mod, verify as verify_mod
from .ingest import files
from .projections import runner
from .simulate import FORMATS, simulate as simulate_lines


def db_option(command):
    """``--db`` on every command (also accepted before the command name)."""
    @click.option("--db", "db_url", metavar="URL|PATH", default=None,
                  help="SQLAlchemy URL or SQLite file path; default $WORKITEM_STORE_URL, "
                       "else sqlite:///workitems.db.")
    @click.pass_context
    @functools.wraps(command)
    def wrapper(ctx, db_url, **kwargs):
        ctx.obj = db_url or (ctx.obj if isinstance(ctx.obj, str) else None)
        with _errors():
            return ctx.invoke(command, **kwargs)
    return wrapper


@contextlib.contextmanager
def _errors():
    try:
        yield
    except db.StoreError as exc:
        raise click.ClickException(str(exc)) from exc


def _engine():
    return db.open_store(click.get_current_context().obj)


def _progress_bar(total: int | None, unit: str, desc: str):
    """A progress bar on a terminal; nothing when stderr is a file or pipe."""
    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=not sys.stderr.isatty(),
                leave=False, file=sys.stderr)


def _echo_json(value) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--db", "db_url", metavar="URL|PATH", default=None, help="Database for the command (see any command's --help).")
@click.version_option(package_name="workitem-store")
@click.pass_context
def main(ctx, db_url):
    """Event-sourced store for Genesys Web Services workitem notifications.

    Every notification is appended, raw and unmodified, to the append-only table event_log;
    projections (workitems, workitem_transitions, capability_history, request_outcomes) are
    derived from it and can always be rebuilt.  The database is --db (a SQLAlchemy URL or a
    SQLite file path), else $WORKITEM_STORE_URL, else sqlite:///workitems.db.

    \b
    Example:
      workitem-store simulate --events 5000 > stream.jsonl
      workitem-store import stream.jsonl
      workitem-store status
    """
    ctx.obj = db_url


@main.command()
@db_option
def init():
    """Create the schema, or upgrade it to the newest revision (alembic).

    Every other command creates the schema in an empty database by itself; init is needed
    only to upgrade a database made by an older version.

    \b
    Example:
      workitem-store init --db postgresql://postgres@127.0.0.1:5432/test
    """
    engine = db.open_engine(click.get_current_context().obj)
    before, after = db.upgrade(engine)
    click.echo(f"schema at revision {after}" + ("" if before == after else f" (was {before or 'empty'})"))


@main.command("import")
@click.argument("paths", nargs=-1, required=True, metavar="PATH|-...")
@click.option("--source", help="Session name for lines without an envelope "
                               "(default: file:<file name>, or stdin).")
@click.option("--again", is_flag=True, help="Import a file even if the same content was imported before.")
@click.option("--no-project", is_flag=True, help="Only append to the log; run `project` later.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@db_option
def import_(paths, source, again, no_project, as_json):
    """Append JSONL notifications to the log, then bring the projections up to date.

    Each line is an envelope {"received_at", "source", "message"} (what export writes), a Bayeux
    message {"channel", "id", "data"}, or a bare {"data": ...}.  Every line becomes one
    event_log row; lines that break the rules are kept but quarantined, and repeated Bayeux
    messages are marked duplicate.  A file is imported whole or not at all.  The exit status is
    non-zero only when input cannot be read or stored.

    \b
    Example:
      workitem-store import captured.jsonl
      cat more.jsonl | workitem-store import - --source agent7
    """
    engine = _engine()
    summaries = []
    for path in paths:
        if path == "-":
            with _progress_bar(None, "B", "stdin") as bar:
                result = files.import_stream(engine, sys.stdin.buffer, file_name="stdin",
                                             source=source or "stdin", progress=bar.update)
        else:
            p = Path(path)
            if not p.is_file():
                raise click.ClickException(f"{path}: no such file")
            with _progress_bar(p.stat().st_size, "B", p.name) as bar:
                result = files.import_file(engine, p, source=source, again=again, progress=bar.update)
        summaries.append(result)
        if not as_json:
            seqs = f" (seq {result.first_seq}-{result.last_seq})" if result.first_seq else ""
            click.echo(f"{result.file_name}: {result.appended} appended{seqs}, "
                       f"{result.duplicates} duplicate, {result.quarantined} quarantined"
                       + (f", {result.blank} blank lines skipped" if result.blank else ""))
            for reason, n in sorted(result.reasons.items(), key=lambda kv: -kv[1]):
                click.echo(f"  quarantined {n}: {reason}")
    projected = None if no_project else runner.project(engine)
    if as_json:
        _echo_json({"imports": [vars(s) for s in summaries],
                    "projected": vars(projected) if projected else None})
    elif projected:
        click.echo(f"projections up to date at seq {projected.to_seq} ({projected.applied} events applied)")


def _project_progress(desc: str):
    bar = _progress_bar(None, "ev", desc)

    def update(seq, head):
        bar.total = head
        bar.n = seq
        bar.refresh()
    return bar, update


@main.command()
@db_option
def project():
    """Apply new log rows to the projections, from each one's checkpoint (safe to repeat).

    A projection whose definition changed (version in projection_checkpoints) is rebuilt.

    \b
    Example:
      workitem-store project
    """
    bar, update = _project_progress("projecting")
    with bar:
        result = runner.project(_engine(), progress=update)
    rebuilt = f"; rebuilt {', '.join(result.rebuilt)}" if result.rebuilt else ""
    click.echo(f"applied {result.applied} events, seq {result.from_seq} -> {result.to_seq}{rebuilt}")


@main.command()
@db_option
def rebuild():
    """Recompute every projection from seq 1, in one transaction.

    \b
    Example:
      workitem-store rebuild --db workitems.db
    """
    bar, update = _project_progress("rebuilding")
    started = dt.datetime.now()
    with bar:
        result = runner.rebuild(_engine(), progress=update)
    seconds = (dt.datetime.now() - started).total_seconds()
    click.echo(f"rebuilt {', '.join(result.rebuilt)} from {result.applied} events "
               f"(log head seq {result.to_seq}) in {seconds:.2f} s")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@db_option
def status(as_json):
    """Row counts, projection checkpoints and lag, quarantine and duplicates, chain head.

    The chain head (seq and hash of the last row) can be written down elsewhere: if any
    earlier row is later altered, `verify` will no longer reach that same hash.

    \b
    Example:
      workitem-store status --json
    """
    engine = _engine()
    with engine.connect() as conn:
        info = status_mod.status(conn)
    if as_json:
        _echo_json(info)
        return
    e = info["event_log"]
    click.echo(f"event_log: {e['rows']} rows, {e['duplicates']} duplicate, {e['quarantined']} quarantined")
    click.echo(f"chain head: seq {e['head_seq']} {e['chain_head']}")
    for reason, n in e["quarantine_reasons"].items():
        click.echo(f"  quarantined {n}: {reason}")
    click.echo("tables: " + ", ".join(f"{name} {n}" for name, n in info["tables"].items()))
    for cp in info["checkpoints"]:
        version = "" if cp["version"] in (None, cp["code_version"]) else f" (version {cp['version']}, code has {cp['code_version']}: run project)"
        click.echo(f"checkpoint {cp['projection']}: seq {cp['last_seq']}, lag {cp['lag']}{version}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@db_option
def verify(as_json):
    """Recompute the hash chain and compare every projection with a fresh rebuild.

    Exits 1 on any difference: a broken chain link (first one: seq, expected, found) or a
    projection row that a rebuild from the log would not produce.

    \b
    Example:
      workitem-store verify
    """
    engine = _engine()
    with engine.connect() as conn:
        report = verify_mod.verify(conn)
    if as_json:
        _echo_json({"ok": report.ok, "rows": report.rows, "head_seq": report.head_seq,
                    "chain_head": report.head_hash,
                    "chain_break": vars(report.chain_break) if report.chain_break else None,
                    "differences": report.differences})
    else:
        brk = report.chain_break
        if brk:
            click.echo(f"chain BROKEN at seq {brk.seq}: {brk.what} expected {brk.expected}, found {brk.found}")
        else:
            click.echo(f"chain ok: {report.rows} rows, head seq {report.head_seq} {report.head_hash}")
        for table, diff in report.differences.items():
            click.echo(f"{table} DIFFERS from a rebuild at seq {diff['checkpoint']}: "
                       f"{diff['missing']} rows missing, {diff['unexpected']} unexpected")
            for example in diff["examples"]:
                click.echo(f"  {example}")
        if not report.differences:
            click.echo("projections ok: equal to a rebuild from the log")
    sys.exit(0 if report.ok else 1)


@main.command("export")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default="-",
              help="File to write (default: standard output).")
@click.option("--after-seq", type=click.IntRange(min=0), default=0, help="Only rows with seq greater than this.")
@click.option("--upto-seq", type=click.IntRange(min=0), default=None, help="Only rows with seq up to this.")
@db_option
def export_(output, after_seq, upto_seq):
    """Write the log as envelope lines in seq order; importing them into an empty database
    reproduces the log (same seq, received_at, source, payload, hashes) and the projections.

    \b
    Example:
      workitem-store export -o backup.jsonl
    """
    engine = _engine()
    with engine.connect() as conn, click.open_file(output, "w", encoding="utf-8") as out:
        for line in export.export_lines(conn, after_seq, upto_seq):
            out.write(line + "\n")


@main.command()
@click.option("--events", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Number of lines to write.")
@click.option("--agents", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of agents; each is one source (session).")
@click.option("--seed", type=int, default=1, show_default=True, help="Random seed: same seed, same stream.")
@click.option("--start", default="2026-11-02T08:00:00Z", show_default=True,
              help="Timestamp of the first notification (envelope format).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="envelope", show_default=True,
              help="envelope (with received_at and source), bayeux message, or bare {data}.")
@click.option("--error-rate", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Share of requests that fail with an Error notification.")
@click.option("--duplicate-rate", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="Share of messages delivered twice.")
@click.option("--noise-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of lines that must be quarantined (other topics, missing ids, broken JSON).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default="-",
              help="File to write (default: standard output).")
def simulate(events, agents, seed, start, fmt, error_rate, duplicate_rate, noise_rate, output):
    """Write a realistic, seeded notification stream as JSONL.

    Workitems go Invited -> Processing -> Completed with capability changes, user data updates
    (PropertiesUpdated), rejections, transfers between agents and failed requests (Error).

    \b
    Example:
      workitem-store simulate --events 100000 --agents 50 --seed 7 -o stream.jsonl
    """
    from .notifications import parse_timestamp

    try:
        first = parse_timestamp(start)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--start") from exc
    lines = simulate_lines(events, agents=agents, seed=seed, fmt=fmt, start=first, error_rate=error_rate,
                           duplicate_rate=duplicate_rate, noise_rate=noise_rate)
    with click.open_file(output, "w", encoding="utf-8") as out:
        for line in lines:
            out.write(line + "\n")


@main.command()
@click.option("--events", type=click.IntRange(min=100), default=100_000, show_default=True,
              help="Number of simulated notifications.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where to put the benchmark's SQLite files (default: a temporary directory).")
def bench(events, workdir):
    """Measure import and rebuild rates on SQLite against raw sqlite3.executemany.

    Prints rows/s for each and their ratios, all measured in this run.

    \b
    Example:
      workitem-store bench --events 200000
    """
    from .bench import run

    for line in run(events, workdir):
        click.echo(line)


if __name__ == "__main__":
    main()
