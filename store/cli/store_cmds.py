"""The store's own commands: init, import, project, rebuild, status, export."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .. import db, seals
from .. import export as export_mod
from .. import status as status_mod
from ..ingest import config as config_mod
from ..ingest import files
from ..projections import follow as follow_mod
from ..projections import runner
from .common import (
    FORCE_HELP,
    OUTPUT_HELP,
    db_option,
    db_target,
    file_size,
    output_file,
    progress_bar,
    project_progress,
    reader_engine,
    writer_engine,
)
from .formatting import echo_json, say, seal_line


@click.command()
@db_option
def init():
    """Create the schema, or upgrade it to the newest revision (alembic).

    The commands that write (import, ingest, project, rebuild, demo) create the schema in an
    empty database by themselves; init is needed to upgrade a database made by an older
    version, or to create an empty store.  Commands that only read (status, verify, history,
    state, export, prove, query) never create one: they refuse a database that is no store.

    \b
    Example:
      workitem-store init --db postgresql://postgres@127.0.0.1:5432/test
    """
    before, after = db.upgrade(db.open_engine(db_target()))
    click.echo(f"schema at revision {after}" + ("" if before == after else f" (was {before or 'empty'})"))


@click.command("import")
@click.argument("paths", nargs=-1, required=True, metavar="PATH|-...")
@click.option("--source", help="Session name for lines without an envelope "
                               "(default: file:<file name>, or stdin).")
@click.option("--again", is_flag=True, help="Import a file even if the same content was imported before.")
@click.option("--force", is_flag=True, help="Import a file even if it does not look like text (most of its first "
                                            "lines not UTF-8, or holding NUL bytes).")
@click.option("--no-project", is_flag=True, help="Only append to the log; run `project` later.")
@click.option("--redact-keys", metavar="K1,K2", envvar=config_mod.REDACT_KEYS_ENV,
              help="Replace the values of these userData keys by the redaction marker before the rows are "
                   f"written (recorded in redactions; the clear values never reach the store); default "
                   f"${config_mod.REDACT_KEYS_ENV}.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--seal-key", type=click.Path(dir_okay=False), metavar="KEYFILE", envvar=seals.KEY_ENV,
              help=f"Seal the log's head after the import (see `seal`); default ${seals.KEY_ENV}.")
@click.option("--witness", type=click.Path(dir_okay=False), metavar="FILE", envvar=seals.WITNESS_ENV,
              help=f"With a seal key: also append the seal to this witness file; default ${seals.WITNESS_ENV}.")
@db_option
def import_cmd(paths, source, again, force, no_project, redact_keys, as_json, seal_key, witness):
    """Append JSONL notifications to the log, then bring the projections up to date.

    Each line is an envelope {"received_at", "source", "message"} (what export writes), a Bayeux
    message {"channel", "id", "data"}, or a bare {"data": ...}.  Files (and standard input)
    compressed with gzip, bzip2 or xz are read as they would be decompressed; one that does not
    look like text is refused unless --force.  Every line becomes one event_log row; lines that
    break the rules are kept but quarantined, and repeated Bayeux messages are marked duplicate.
    A file of up to 200,000 lines and 256 MiB (and standard input) is imported whole or not at
    all; a larger one commits in steps of that size, and if it stops half-way, importing the
    same file again resumes where it stopped (`status` lists incomplete imports).  The exit
    status is non-zero only when input cannot be read or stored.

    \b
    Example:
      workitem-store import captured.jsonl
      workitem-store import capture-2026-11-02.jsonl.gz
      cat more.jsonl | workitem-store import - --source agent7
      workitem-store import cards.jsonl --redact-keys CardNumber,CVV
    """
    sealing = seals.Sealing.configured(seal_key, witness)
    keys = config_mod.redact_keys(redact_keys)
    engine = writer_engine()
    summaries, projected, sealed = [], None, None
    try:
        for path in paths:
            if path == "-":
                with progress_bar(None, "B", "stdin") as bar:
                    result = files.import_stream(engine, sys.stdin.buffer, file_name="stdin",
                                                 source=source or "stdin", progress=bar.update, force=force,
                                                 redact_keys=keys)
            else:
                with progress_bar(file_size(path), "B", Path(path).name) as bar:
                    result = files.import_file(engine, Path(path), source=source, again=again, progress=bar.update,
                                               force=force, redact_keys=keys)
            summaries.append(result)
            if not as_json:
                _print_import(result)
    finally:
        if summaries and not no_project:  # what did get in is projected even if a later file failed
            bar, update = project_progress("projecting")
            with bar:
                projected = runner.project(engine, progress=update)
        if summaries and sealing:  # and sealed
            sealed = sealing.seal(engine)
            if not as_json:
                click.echo(seal_line(sealed))
    if as_json:
        echo_json({"imports": [vars(s) for s in summaries],
                   "projected": vars(projected) if projected else None,
                   "seal": sealed.as_dict() if sealed else None})
    elif projected:
        click.echo(f"projections up to date at seq {projected.to_seq} ({projected.applied} events applied)")


def _print_import(result: files.ImportResult) -> None:
    seqs = f" (seq {result.first_seq}-{result.last_seq})" if result.first_seq else ""
    if result.resumed_at is not None:
        say(f"{result.file_name}: resuming an incomplete import at byte {result.resumed_at}")
    say(f"{result.file_name}: {result.appended} appended{seqs}, {result.duplicates} duplicate, "
        f"{result.quarantined} quarantined" + (f", {result.blank} blank lines skipped" if result.blank else ""))
    for reason, n in sorted(result.reasons.items(), key=lambda kv: -kv[1]):
        say(f"  quarantined {n}: {reason}")


@click.command()
@click.option("--follow", is_flag=True, help="Keep going: project again every --interval-ms until "
                                              "interrupted (SIGINT or SIGTERM).")
@click.option("--interval-ms", type=click.IntRange(min=1), default=500, show_default=True,
              help="With --follow: milliseconds between runs.")
@db_option
def project(follow, interval_ms):
    """Apply new log rows to the projections, from each one's checkpoint (safe to repeat).

    A projection whose definition changed (version in projection_checkpoints) is rebuilt.
    With --follow it keeps projecting what other processes append (e.g. `import`, or `ingest
    --no-project`), printing a line whenever it applied something.

    \b
    Example:
      workitem-store project
      workitem-store project --follow --interval-ms 200
    """
    engine = writer_engine()
    if follow:
        last = follow_mod.follow(engine, interval_ms / 1000, lambda r: click.echo(
            f"applied {r.applied} events, seq {r.from_seq} -> {r.to_seq}"))
        click.echo(f"stopped; projections at seq {last.to_seq}")
        return
    bar, update = project_progress("projecting")
    with bar:
        result = runner.project(engine, progress=update)
    rebuilt = f"; rebuilt {', '.join(result.rebuilt)}" if result.rebuilt else ""
    click.echo(f"applied {result.applied} events, seq {result.from_seq} -> {result.to_seq}{rebuilt}")


@click.command()
@db_option
def rebuild():
    """Recompute every projection from seq 1, in one transaction.

    \b
    Example:
      workitem-store rebuild --db workitems.db
    """
    engine = writer_engine()
    bar, update = project_progress("rebuilding")
    started = time.monotonic()
    with bar:
        result = runner.rebuild(engine, progress=update)
    click.echo(f"rebuilt {', '.join(result.rebuilt)} from {result.applied} events "
               f"(log head seq {result.to_seq}) in {time.monotonic() - started:.2f} s")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@db_option
def status(as_json):
    """Row counts, projection checkpoints and lag, quarantine and duplicates, chain head.

    The chain head (seq and hash of the last row) is what a seal signs (`seal`); the last seal
    and the rows appended since it are shown.

    \b
    Example:
      workitem-store status --json
    """
    with db.snapshot(reader_engine()) as conn:
        info = status_mod.status(conn)
    if as_json:
        echo_json(info)
        return
    e = info["event_log"]
    records = "" if e["rows"] == e["kinds"]["notification"] else (
        f" ({e['kinds']['notification']} notifications, {e['kinds']['session']} session markers, "
        f"{e['kinds']['snapshot']} snapshots of live ingest)")
    click.echo(f"event_log: {e['rows']} rows{records}, {e['duplicates']} duplicate, {e['quarantined']} quarantined")
    say(f"chain head: seq {e['head_seq']} {e['chain_head']}")
    sealed = info["last_seal"]
    click.echo("last seal: none (see `workitem-store seal`)" if sealed is None else
               f"last seal: {sealed['n']} at seq {sealed['seq']}, {sealed['sealed_at']}"
               f"{'' if sealed['witnessed'] else ' (table only, no witness file)'}; "
               f"{sealed['rows_since']} rows since")
    for reason, n in e["quarantine_reasons"].items():
        say(f"  quarantined {n}: {reason}")
    click.echo("tables: " + ", ".join(f"{name} {n}" for name, n in info["tables"].items()))
    for cp in info["checkpoints"]:
        version = ("" if cp["version"] in (None, cp["code_version"])
                   else f" (version {cp['version']}, code has {cp['code_version']}: run project)")
        click.echo(f"checkpoint {cp['projection']}: seq {cp['last_seq']}, lag {cp['lag']}{version}")
    for f in info["incomplete_imports"]:
        say(f"INCOMPLETE import of {f['file_name']} (sha256 {f['sha256'][:12]}…): {f['rows']} rows, "
            f"{f['resume_offset']} bytes in the log; import the file again to resume")
    if info["projection_errors"]:
        click.echo(f"projection errors: {info['tables']['projection_errors']} log rows skipped, first ones:")
        for err in info["projection_errors"]:
            say(f"  {err['projection']} skipped seq {err['seq']}: {err['error']}")


@click.command("export")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), default="-", help=OUTPUT_HELP)
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--after-seq", type=click.IntRange(min=0), default=0, help="Only rows with seq greater than this.")
@click.option("--upto-seq", type=click.IntRange(min=0), default=None, help="Only rows with seq up to this.")
@db_option
def export_cmd(output_path, force, after_seq, upto_seq):
    """Write the log as envelope lines in seq order; importing them into an empty database
    reproduces the log (same seq, received_at, source, payload, hashes) and the projections.

    \b
    Example:
      workitem-store export -o backup.jsonl
    """
    engine = reader_engine()  # first: a missing store is the error, not the output file
    with output_file(output_path, force) as out, db.snapshot(engine) as conn:
        for line in export_mod.export_lines(conn, after_seq, upto_seq):
            out.write(line + "\n")
