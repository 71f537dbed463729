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

from . import audit, db, export, output, proofs, seals
from . import query as query_mod
from . import status as status_mod
from . import verify as verify_mod
from .ingest import files
from .projections import runner
from .simulate import FORMATS
from .simulate import simulate as simulate_lines


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
        raise click.ClickException(output.safe_text(exc)) from exc


def _engine():
    return db.open_store(click.get_current_context().obj)


def _query_engine():
    """For commands that only read: an existing store (never created here); a SQLite file is
    opened read-only."""
    return db.open_reader(click.get_current_context().obj)


class _Utf8Text(click.ParamType):
    """Text that the store can hold: an argument whose bytes are not UTF-8 (Python keeps them
    as lone surrogates) is a usage error, not a traceback from the database driver."""

    name = "text"

    def convert(self, value, param, ctx):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            self.fail(f"{output.safe_text(ascii(value))} is not UTF-8 text (the store holds only UTF-8)", param, ctx)
        return value


UTF8_TEXT = _Utf8Text()


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

    The commands that write (import, ingest, project, rebuild, demo) create the schema in an
    empty database by themselves; init is needed to upgrade a database made by an older
    version, or to create an empty store.  Commands that only read (status, verify, history,
    state, export, query) never create one: they refuse a database that is no store.

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
@click.option("--seal-key", type=click.Path(dir_okay=False), metavar="KEYFILE", envvar=seals.KEY_ENV,
              help=f"Seal the log's head after the import (see `seal`); default ${seals.KEY_ENV}.")
@click.option("--witness", type=click.Path(dir_okay=False), metavar="FILE", envvar=seals.WITNESS_ENV,
              help=f"With a seal key: also append the seal to this witness file; default ${seals.WITNESS_ENV}.")
@db_option
def import_(paths, source, again, no_project, as_json, seal_key, witness):
    """Append JSONL notifications to the log, then bring the projections up to date.

    Each line is an envelope {"received_at", "source", "message"} (what export writes), a Bayeux
    message {"channel", "id", "data"}, or a bare {"data": ...}.  Every line becomes one
    event_log row; lines that break the rules are kept but quarantined, and repeated Bayeux
    messages are marked duplicate.  A file of up to 200,000 lines and 256 MiB (and standard
    input) is imported whole or not at all; a larger one commits in steps of that size, and
    if it stops half-way, importing the same file again resumes where it stopped (`status`
    lists incomplete imports).  The exit status is non-zero only when input cannot be read or
    stored.

    \b
    Example:
      workitem-store import captured.jsonl
      cat more.jsonl | workitem-store import - --source agent7
    """
    sealing = seals.Sealing.configured(seal_key, witness)
    engine = _engine()
    summaries, projected, sealed = [], None, None
    try:
        for path in paths:
            summaries.append(_import_one(engine, path, source, again))
            if not as_json:
                _print_import(summaries[-1])
    finally:
        if summaries and not no_project:  # what did get in is projected even if a later file failed
            bar, update = _project_progress("projecting")
            with bar:
                projected = runner.project(engine, progress=update)
        if summaries and sealing:  # and sealed
            sealed = sealing.seal(engine)
            if not as_json:
                _print_seal(sealed)
    if as_json:
        _echo_json({"imports": [vars(s) for s in summaries],
                    "projected": vars(projected) if projected else None,
                    "seal": sealed.as_dict() if sealed else None})
    elif projected:
        click.echo(f"projections up to date at seq {projected.to_seq} ({projected.applied} events applied)")


def _import_one(engine, path: str, source: str | None, again: bool) -> files.ImportResult:
    if path == "-":
        with _progress_bar(None, "B", "stdin") as bar:
            return files.import_stream(engine, sys.stdin.buffer, file_name="stdin",
                                       source=source or "stdin", progress=bar.update)
    p = Path(path)
    if not p.is_file():
        raise click.ClickException(f"{path}: no such file")
    with _progress_bar(p.stat().st_size, "B", p.name) as bar:
        return files.import_file(engine, p, source=source, again=again, progress=bar.update)


def _print_import(result: files.ImportResult) -> None:
    seqs = f" (seq {result.first_seq}-{result.last_seq})" if result.first_seq else ""
    if result.resumed_at is not None:
        click.echo(f"{output.safe_text(result.file_name)}: resuming an incomplete import at byte {result.resumed_at}")
    click.echo(f"{output.safe_text(result.file_name)}: {result.appended} appended{seqs}, "
               f"{result.duplicates} duplicate, {result.quarantined} quarantined"
               + (f", {result.blank} blank lines skipped" if result.blank else ""))
    for reason, n in sorted(result.reasons.items(), key=lambda kv: -kv[1]):
        click.echo(f"  quarantined {n}: {output.safe_text(reason)}")


def _project_progress(desc: str):
    bar = _progress_bar(None, "ev", desc)

    def update(seq, head):
        bar.total = head
        bar.n = seq
        bar.refresh()
    return bar, update


@main.command()
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
    if follow:
        _project_follow(_engine(), interval_ms / 1000)
        return
    bar, update = _project_progress("projecting")
    with bar:
        result = runner.project(_engine(), progress=update)
    rebuilt = f"; rebuilt {', '.join(result.rebuilt)}" if result.rebuilt else ""
    click.echo(f"applied {result.applied} events, seq {result.from_seq} -> {result.to_seq}{rebuilt}")


def _stop_on_signals():
    """A threading.Event set by SIGINT or SIGTERM (handlers installed in the main thread)."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _project_follow(engine, interval: float) -> None:
    stop = _stop_on_signals()
    while True:
        result = runner.project(engine)
        if result.applied or result.rebuilt:
            click.echo(f"applied {result.applied} events, seq {result.from_seq} -> {result.to_seq}")
        if stop.wait(interval):
            break
    click.echo(f"stopped; projections at seq {runner.project(engine).to_seq}")


class ByteSize(click.ParamType):
    """A size in bytes: a number, optionally with K, M, G or T (powers of 1024), e.g. 500M."""

    name = "size"
    _UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        number, unit = (text[:-1], text[-1]) if text[-1:] in self._UNITS else (text, "")
        try:
            size = int(float(number) * self._UNITS[unit])
        except ValueError:
            self.fail(f"{value!r} is not a size (e.g. 1073741824, 500M, 2G)", param, ctx)
        if size <= 0:
            self.fail(f"{value!r}: a size must be positive", param, ctx)
        return size


@main.command()
@click.option("--gws-url", metavar="URL", help="GWS server, e.g. https://gws.example.com (the notifications "
                                               "endpoint is URL/api/v2/notifications); with --config, the "
                                               "default for a file without gws_url.")
@click.option("--user", help="GWS user (HTTP Basic login) of the one session.")
@click.option("--password-env", metavar="VAR", help="Environment variable holding that user's password.")
@click.option("--source", help="Source stored with the session's notifications (default: the user name).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE.toml",
              help="Many sessions from a TOML file instead of --user/--password-env/--source.")
@click.option("--ca-file", type=click.Path(dir_okay=False), metavar="PEM",
              help="CA certificates to trust for https (instead of the system's), e.g. a private CA.")
@click.option("--client-cert", type=click.Path(dir_okay=False), metavar="PEM",
              help="Client certificate for https (with its key, or see --client-key).")
@click.option("--client-key", type=click.Path(dir_okay=False), metavar="PEM", help="The client certificate's key.")
@click.option("--proxy", metavar="URL", help="HTTP proxy for every request (default: $HTTPS_PROXY / $HTTP_PROXY, "
                                             "except hosts in $NO_PROXY).")
@click.option("--notifications-path", metavar="PATH", default=None,
              help="Path of the CometD endpoint under the GWS URL [default: /api/v2/notifications].")
@click.option("--spool", "spool_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Where batches wait, fsync'd, while the database cannot take them (default: DB.spool next "
                   "to a SQLite store, ./workitem-store-spool for PostgreSQL).")
@click.option("--spool-max", type=ByteSize(), default="1G", show_default=True, metavar="SIZE",
              help="Bound of the spool (e.g. 500M, 2G); when reached, batches are not acknowledged (the server "
                   "keeps them) until it drains.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
              help="Serve /metrics (Prometheus) and /healthz on 127.0.0.1:PORT (0: any free port).")
@click.option("--no-project", is_flag=True, help="Only append to the log (run `project --follow` elsewhere).")
@click.option("--seal-key", type=click.Path(dir_okay=False), metavar="KEYFILE", envvar=seals.KEY_ENV,
              help=f"Seal the log's head every --seal-every seconds and at shutdown (see `seal`); default "
                   f"${seals.KEY_ENV}, else the config file's seal_key.  Without a key nothing is sealed.")
@click.option("--witness", type=click.Path(dir_okay=False), metavar="FILE", envvar=seals.WITNESS_ENV,
              help=f"Also append each seal to this witness file; default ${seals.WITNESS_ENV}, else the config "
                   "file's witness.")
@click.option("--seal-every", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS",
              help="Seconds between seals (default: the config file's seal_every, else 600).")
@click.option("-v", "--verbose", is_flag=True, help="Log each appended batch.")
@db_option
def ingest(gws_url, user, password_env, source, config_path, ca_file, client_cert, client_key, proxy,
           notifications_path, spool_dir, spool_max, metrics_port, no_project, seal_key, witness, seal_every,
           verbose):
    """Follow GWS workitem notifications live (CometD /v2/me/workitems) into the log.

    Each session handshakes with HTTP Basic auth (and the CSRF token of GET /api/v2/me, where
    the server has one), subscribes to /v2/me/workitems, and then:

    \b
    - records in the log that it started (and later that it was lost, resumed or ended), so
      `ingest_gaps` shows every interval in which notifications may be missing;
    - reads GET /api/v2/me/workitems?fields=* and stores the answer (a snapshot), from which
      the projections reconcile what happened while nobody listened;
    - acknowledges each batch (CometD ack extension) only once it is durable: in the log, or,
      while the database is slow or down, in the spool (fsync'd), drained into the log in
      order when it is back.  A restart drains what a killed process left first.

    A TLS certificate that is not accepted stops that session at once, naming the problem.
    SIGINT or SIGTERM disconnects every session, writes what waits, brings the projections
    up to date and exits 0.  Passwords come from environment variables, never from the
    command line.

    With a seal key FILE (--seal-key, $WORKITEM_STORE_SEAL_KEY or the config file's seal_key),
    the log's head is sealed every --seal-every seconds and at shutdown; a seal that fails is
    retried at the next interval and shown in /healthz, never stops ingest.

    \b
    A config file lists many sessions (ca_file, client_cert, client_key, proxy, gws_url and
    notifications_path may be set at the top for all, or per session):
      gws_url = "https://gws.example.com"
      ca_file = "/etc/ssl/gws-ca.pem"
      [[sessions]]
      user = "agent1"
      password_env = "AGENT1_PW"
      source = "agent1"          # optional, default the user name
    and, at the top only, the store's sealing: seal_key = "/etc/workitem-store/seal.key",
    witness = "/mnt/worm/seals.jsonl", seal_every = 600.

    \b
    Example:
      AGENT1_PW=... workitem-store ingest --gws-url https://gws.example.com \\
          --user agent1 --password-env AGENT1_PW --metrics-port 9108
      workitem-store ingest --config agents.toml --db postgresql://ingest@db:5432/workitems \\
          --spool /var/spool/workitem-store --spool-max 2G
    """
    import asyncio
    import logging

    from .ingest import config as config_mod
    from .ingest.service import Ingestor, TaskNameFilter

    connection = {"ca_file": ca_file, "client_cert": client_cert, "client_key": client_key, "proxy": proxy,
                  "notifications_path": notifications_path}
    if config_path:
        if user or password_env or source:
            raise click.UsageError("give either --config or --user/--password-env/--source, not both")
        configs = config_mod.load_config(config_path, gws_url=gws_url, **connection)
    else:
        if not (gws_url and user and password_env):
            raise click.UsageError("give --gws-url, --user and --password-env (or --config FILE.toml)")
        connection["notifications_path"] = notifications_path or config_mod.NOTIFICATIONS_PATH
        configs = [config_mod.SessionConfig(gws_url, user, config_mod.password_from_env(password_env), source,
                                            **connection)]
    for config in configs:
        config.ssl_context()  # a CA file or client certificate that cannot be used: say so now
    # Options and environment variables win over the config file; no key: nothing is sealed.
    in_file = config_mod.load_sealing(config_path) if config_path else config_mod.SealingConfig()
    sealing = seals.Sealing.configured(seal_key or in_file.seal_key, witness or in_file.witness,
                                       seal_every or in_file.seal_every)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TaskNameFilter())  # [gws <source>]: which session a line is about
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(task)s] %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("aiohttp.access", "alembic", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    engine = _engine()

    async def follow():
        import signal

        asyncio.current_task().set_name("ingest")
        ingestor = Ingestor(engine, configs, project=not no_project, metrics_port=metrics_port,
                            spool_dir=spool_dir, spool_max=spool_max, sealing=sealing)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, ingestor.stop)
        errors = await ingestor.run()
        return ingestor, errors

    ingestor, errors = asyncio.run(follow())
    for s in ingestor.sessions:
        click.echo(f"{s.source}: {s.stats.received} received, {s.stats.stored} stored, {s.stats.appended} appended, "
                   f"{s.stats.duplicates} duplicate, {s.stats.quarantined} quarantined, "
                   f"{s.client.handshakes} handshakes, {s.client.reconnects} reconnects, "
                   f"{s.stats.snapshots} snapshots")
    if ingestor.last_projected_seq is not None:
        click.echo(f"projections up to date at seq {ingestor.last_projected_seq}")
    if sealing is not None:
        click.echo(f"{ingestor.seals_made} seals made, {ingestor.seal_failures} failed")
        if ingestor.last_seal is not None:
            _print_seal(ingestor.last_seal)
        if ingestor.seal_error is not None:
            click.echo(f"the last seal failed: {output.safe_text(ingestor.seal_error)} (seal the log's head by "
                       "hand: `workitem-store seal`)", err=True)
    if ingestor.writer.spool_bytes():
        click.echo(f"{ingestor.writer.spool_bytes()} bytes stay in the spool {ingestor.spool.directory}: "
                   "the next `ingest` on this store drains them first", err=True)
    if errors and not ingestor.stopped_by_request:
        raise click.ClickException("; ".join(f"{name}: {exc}" for name, exc in errors))


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

    The chain head (seq and hash of the last row) is what a seal signs (`seal`); the last seal
    and the rows appended since it are shown.

    \b
    Example:
      workitem-store status --json
    """
    with db.snapshot(_query_engine()) as conn:
        info = status_mod.status(conn)
    if as_json:
        _echo_json(info)
        return
    e = info["event_log"]
    records = "" if e["rows"] == e["kinds"]["notification"] else (
        f" ({e['kinds']['notification']} notifications, {e['kinds']['session']} session markers, "
        f"{e['kinds']['snapshot']} snapshots of live ingest)")
    click.echo(f"event_log: {e['rows']} rows{records}, {e['duplicates']} duplicate, {e['quarantined']} quarantined")
    click.echo(output.safe_text(f"chain head: seq {e['head_seq']} {e['chain_head']}"))
    sealed = info["last_seal"]
    click.echo("last seal: none (see `workitem-store seal`)" if sealed is None else
               f"last seal: {sealed['n']} at seq {sealed['seq']}, {sealed['sealed_at']}"
               f"{'' if sealed['witnessed'] else ' (table only, no witness file)'}; "
               f"{sealed['rows_since']} rows since")
    for reason, n in e["quarantine_reasons"].items():
        click.echo(f"  quarantined {n}: {output.safe_text(reason)}")
    click.echo("tables: " + ", ".join(f"{name} {n}" for name, n in info["tables"].items()))
    for cp in info["checkpoints"]:
        version = "" if cp["version"] in (None, cp["code_version"]) else f" (version {cp['version']}, code has {cp['code_version']}: run project)"
        click.echo(f"checkpoint {cp['projection']}: seq {cp['last_seq']}, lag {cp['lag']}{version}")
    for f in info["incomplete_imports"]:
        click.echo(output.safe_text(
            f"INCOMPLETE import of {f['file_name']} (sha256 {f['sha256'][:12]}…): {f['rows']} rows, "
            f"{f['resume_offset']} bytes in the log; import the file again to resume"))
    if info["projection_errors"]:
        click.echo(f"projection errors: {info['tables']['projection_errors']} log rows skipped, first ones:")
        for err in info["projection_errors"]:
            click.echo(output.safe_text(f"  {err['projection']} skipped seq {err['seq']}: {err['error']}"))


@main.command()
@click.option("--witness", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Also check the seals of this witness file: every one signed, linked, in the store's seals "
                   "table alike, and holding in the log; every seal the store wrote to a witness is in it.")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False), metavar="KEYFILE.pub",
              help="Check each seal's signature with this public key (`keygen` wrote it).")
@click.option("--since-last-seal", is_flag=True,
              help="Check the chain only from the newest seal that holds to the head (and the seals); the "
                   "projections are not compared.  Fast enough to run daily; the default checks everything.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@db_option
def verify(witness, public_key, since_last_seal, as_json):
    """Check the seals, the hash chain and every projection against a fresh rebuild.

    Exits 1 on any of: a seal that no longer holds (its signature, its link to the seal before,
    the log's chain_hash at its seq, or a log shorter than it: TRUNCATED), a log shorter than
    what the store remembers (imported files' seq ranges, projection checkpoints, kept row
    counts), a broken chain link (first one: seq, expected, found), a row whose extracted
    columns (channel, message_id, ..., reference_id) disagree with its payload, a projection row
    that a rebuild from the log would not produce, projections that lag the log (their checkpoint
    is not the head: run `project` first), or row counts kept for `status` (event_log_counts,
    projection_checkpoints.rows) that disagree with the tables.

    \b
    Example:
      workitem-store verify
      workitem-store verify --witness /mnt/worm/seals.jsonl --public-key seal.key.pub
      workitem-store verify --since-last-seal --witness /mnt/worm/seals.jsonl --public-key seal.key.pub
    """
    key = seals.load_public_key(public_key) if public_key else None
    with db.snapshot(_query_engine()) as conn:
        report = verify_mod.verify(conn, witness, key, since_last_seal)
    if as_json:
        _echo_json(_verify_json(report))
    else:
        _print_verify(report)
    sys.exit(0 if report.ok else 1)


def _verify_json(report: verify_mod.VerifyReport) -> dict:
    sealed = report.seals
    return {"ok": report.ok, "rows": report.rows, "head_seq": report.head_seq, "chain_head": report.head_hash,
            "chain_break": vars(report.chain_break) if report.chain_break else None,
            "column_mismatch": vars(report.column_mismatch) if report.column_mismatch else None,
            "differences": report.differences, "lagging": report.lagging,
            "counts_mismatch": report.counts_mismatch, "truncated": report.truncated,
            "seals": None if sealed is None else {
                "checked": sealed.seals, "in_witness": sealed.witness_seals,
                "signatures_checked": sealed.signatures_checked,
                "last_valid": sealed.last_valid.as_dict() if sealed.last_valid else None,
                "problems": [vars(p) for p in sealed.problems]},
            "since_seal": report.since_seal.n if report.since_seal else None}


def _print_verify(report: verify_mod.VerifyReport) -> None:
    say = lambda line: click.echo(output.safe_text(line))  # noqa: E731
    sealed = report.seals
    if sealed is not None and (sealed.seals or sealed.problems):  # (a witness file of no use is a problem)
        signed = "signatures checked" if sealed.signatures_checked else "signatures NOT checked (no --public-key)"
        if sealed.problems:
            first = sealed.first_broken
            holds = (f"; the last seal that holds is {sealed.last_valid.n} (seq {sealed.last_valid.seq})"
                     if sealed.last_valid else "")
            differs = _first_difference(report)
            say(f"seals BROKEN: {first}{holds}{differs}")
            for problem in sealed.problems[1:]:
                say(f"  also: {problem}")
        else:
            last = sealed.last_valid
            say(f"seals ok: {sealed.seals} seals, {signed}, newest {last.n} at seq {last.seq} sealed {last.sealed_at}")
    elif sealed is not None:
        say("no seals: nothing outside this database vouches for the log (see `workitem-store seal`)")
    for t in report.truncated:
        say(f"log TRUNCATED: it ends at seq {report.log_head_seq} but {t['table']} records rows up to seq {t['seq']}")
    brk = report.chain_break
    since = f" from seal {report.since_seal.n} (seq {report.since_seal.seq})" if report.since_seal else ""
    if brk:
        say(f"chain BROKEN at seq {brk.seq}: {brk.what} expected {brk.expected}, found {brk.found}")
    else:
        say(f"chain ok{since}: {report.rows} rows, head seq {report.head_seq} {report.head_hash}")
    bad = report.column_mismatch
    if bad:
        say(f"event_log column {bad.what} at seq {bad.seq} DISAGREES with the payload: "
            f"expected {bad.expected}, found {bad.found}")
    for table, diff in report.differences.items():
        say(f"{table} DIFFERS from a rebuild at seq {diff['checkpoint']}: "
            f"{diff['missing']} rows missing, {diff['unexpected']} unexpected")
        for kind in ("missing", "unexpected"):
            for example in diff[f"{kind}_examples"]:
                say(f"  {kind}: {example}")
    for c in report.counts_mismatch:
        counted = (f"for kind {c['kind']}, quarantine reason {c['quarantine_reason']!r}, duplicate "
                   f"{c['duplicate']}: the log holds" if c["table"] == "event_log_counts" else
                   f"for {c['projection']}: its table holds")
        say(f"{c['table']} DISAGREES {counted} {c['counted']} rows, {c['table']} says {c['recorded']}")
    for name, seq in report.lagging.items():
        say(f"{name} LAGS the log: checkpoint seq {seq}, log head seq {report.log_head_seq} "
            "(run `workitem-store project`)")
    if not report.projections_compared:
        say("projections not compared (--since-last-seal)")
    elif not report.differences:
        say("projections ok: equal to a rebuild from the log" + (" at their checkpoints" if report.lagging else ""))


def _first_difference(report: verify_mod.VerifyReport) -> str:
    """Where the first changed row is, as far as the chain and the seals tell (nothing when no
    row is known to differ: a seal altered or missing, or only removed rows)."""
    if report.chain_break is not None:
        return f"; the first row that differs is seq {report.chain_break.seq}"
    moved = next((p for p in report.seals.problems if p.n is not None and p.problem.startswith(seals.HEAD_DIFFERS)),
                 None)
    if moved is None:
        return ""
    after = report.seals.last_valid.seq if report.seals.last_valid else 0
    if after < moved.seq <= report.log_head_seq:
        return (f"; the first row that differs is between seq {after + 1} and {moved.seq} "
                "(the chain was recomputed over it)")
    return ""


@main.command()
@click.argument("keyfile", type=click.Path(dir_okay=False))
def keygen(keyfile):
    """Make an Ed25519 key pair for seals: the private key to KEYFILE (mode 0600), the public key to
    KEYFILE.pub.  Neither is ever overwritten.

    Keep KEYFILE where only the sealing process reads it; give KEYFILE.pub to auditors.

    \b
    Example:
      workitem-store keygen /etc/workitem-store/seal.key
    """
    with _errors():
        private_path, public_path = seals.keygen(keyfile)
        key_id = seals.key_id(seals.load_public_key(public_path))
    for line in (f"private key: {private_path} (mode 0600)", f"public key:  {public_path}", f"key id:      {key_id}"):
        click.echo(output.safe_text(line))


def _print_seal(made: seals.Seal) -> None:
    where = "the seals table and the witness file" if made.witnessed else "the seals table"
    click.echo(f"sealed: seal {made.n}, seq {made.seq}, chain_hash {made.chain_hash}, {made.sealed_at} "
               f"(in {where})")


@main.command()
@click.option("--key", "key_path", type=click.Path(dir_okay=False), metavar="KEYFILE", envvar=seals.KEY_ENV,
              required=True, help=f"The private key (`keygen`); default ${seals.KEY_ENV}.")
@click.option("--witness", type=click.Path(dir_okay=False), metavar="FILE", envvar=seals.WITNESS_ENV,
              help="Also append the seal to this file (JSON Lines, append-only, fsync'd): keep it outside the "
                   f"database, on WORM storage or in a SIEM; default ${seals.WITNESS_ENV}.")
@click.option("--json", "as_json", is_flag=True, help="Print the seal as JSON.")
@db_option
def seal(key_path, witness, as_json):
    """Sign the log's head (seq, chain_hash, row count, time, store id) and record the seal in the
    store's seals table and, with --witness, in a witness file.

    Anyone with the public key can then check that the log still holds what was sealed
    (`verify --witness FILE --public-key KEYFILE.pub`), or that one row is in it (`prove`,
    `check-proof`).

    \b
    Example:
      workitem-store seal --key /etc/workitem-store/seal.key --witness /mnt/worm/seals.jsonl
    """
    made = seals.seal(_engine(), seals.load_private_key(key_path), witness)
    if as_json:
        _echo_json(made.as_dict())
    else:
        _print_seal(made)


OUTPUT_HELP = ("File to write (default: standard output).  It is written whole or not at all (a temporary "
               "file renamed over it when complete); never the store itself, nor any other SQLite database "
               "unless --force.")
FORCE_HELP = "Overwrite an existing SQLite database file given as -o (never the store itself)."


def _output_file(path: str, force: bool):
    """atomic_output for -o: never over the store of this command (--db), nor unforced over any SQLite file."""
    return output.atomic_output(path, force, output.store_files(click.get_current_context().obj))


@main.command("export")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), default="-", help=OUTPUT_HELP)
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--after-seq", type=click.IntRange(min=0), default=0, help="Only rows with seq greater than this.")
@click.option("--upto-seq", type=click.IntRange(min=0), default=None, help="Only rows with seq up to this.")
@db_option
def export_(output_path, force, after_seq, upto_seq):
    """Write the log as envelope lines in seq order; importing them into an empty database
    reproduces the log (same seq, received_at, source, payload, hashes) and the projections.

    \b
    Example:
      workitem-store export -o backup.jsonl
    """
    with _output_file(output_path, force) as out, db.snapshot(_query_engine()) as conn:
        for line in export.export_lines(conn, after_seq, upto_seq):
            out.write(line + "\n")


@main.command()
@click.argument("seq", type=click.IntRange(min=1))
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), default="-", help=OUTPUT_HELP)
@click.option("--force", is_flag=True, help=FORCE_HELP)
@db_option
def prove(seq, output_path, force):
    """Write a proof that the log row SEQ is in the log unaltered, checkable without the database:
    the row (payload included), the chain links from it to the next seal, and that seal.

    Its size grows with the rows between SEQ and the next seal (about 300 bytes a row).

    \b
    Example:
      workitem-store prove 1234 -o proof.json
      workitem-store check-proof proof.json --public-key seal.key.pub
    """
    with db.snapshot(_query_engine()) as conn:
        proof = proofs.prove(conn, seq)
    with _output_file(output_path, force) as out:
        out.write(proofs.dumps(proof))


@main.command("check-proof")
@click.argument("proof_file", type=click.Path(exists=True, dir_okay=False), metavar="PROOF.json")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False), metavar="KEYFILE.pub", required=True,
              help="The public key of the store's seals.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check_proof(proof_file, public_key, as_json):
    """Check a proof written by `prove`, with the public key alone (no database): the row's
    payload hash, every chain link up to the seal, and the seal's signature.  Exits 1 if any
    byte of the proof was changed.
    """
    with _errors():
        result = proofs.check(Path(proof_file).read_bytes(), seals.load_public_key(public_key))
    if as_json:
        _echo_json(vars(result))
    else:
        click.echo(output.safe_text(("proof ok: " if result.ok else "proof FAILS: ") + result.message))
    sys.exit(0 if result.ok else 1)


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
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), default="-", help=OUTPUT_HELP)
@click.option("--force", is_flag=True, help=FORCE_HELP)
def simulate(events, agents, seed, start, fmt, error_rate, duplicate_rate, noise_rate, output_path, force):
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
    with _errors(), _output_file(output_path, force) as out:
        for line in lines:
            out.write(line + "\n")


@main.command("simulate-server")
@click.option("--port", type=click.IntRange(0, 65535), default=8090, show_default=True,
              help="Port on 127.0.0.1 (0: any free port).")
@click.option("--agents", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of agents: users agent-001, agent-002, ...")
@click.option("--password-env", metavar="VAR", default=None,
              help="Environment variable holding the agents' password; without it, or if the variable "
                   "is unset or empty, the password is \"demo\".")
@click.option("--rate", type=click.FloatRange(min=0), default=100.0, show_default=True,
              help="Notifications per second over all agents (0: as fast as possible).")
@click.option("--events", type=click.IntRange(min=0), default=None,
              help="Stop publishing after this many notifications (default: never).")
@click.option("--csrf/--no-csrf", default=True, show_default=True,
              help="Require the X-CSRF-TOKEN header (from GET /api/v2/me) on POST requests.")
@click.option("--seed", type=int, default=1, show_default=True, help="Random seed: same seed, same stream.")
@click.option("--ack", type=click.Choice(["on", "object", "off"]), default="on", show_default=True,
              help="CometD ack extension: on (handshake reply ext {ack: true}), object ({ack: {enabled: "
                   "true, batch: N}}, as Java CometD with message delivery during handshake) or off.")
@click.option("--java-402", is_flag=True,
              help="Word an unknown session as Java CometD does (402::Unknown client) instead of "
                   "402::session_unknown (the Node server).")
@click.option("--timeout", "timeout_ms", type=click.IntRange(min=0), default=30_000, show_default=True,
              metavar="MS", help="How long a /meta/connect is held (advice.timeout), in milliseconds.")
@click.option("--max-interval", "max_interval_ms", type=click.IntRange(min=1), default=10_000,
              show_default=True, metavar="MS",
              help="A session without a /meta/connect for this many milliseconds expires, with its queue.")
@click.option("--wait-for-sessions", is_flag=True,
              help="Start publishing only once every agent has a subscribed session.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), metavar="PEM", default=None,
              help="Serve https with this certificate (chain) file; needs --tls-key.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), metavar="PEM", default=None,
              help="The private key of --tls-cert.")
def simulate_server(port, agents, password_env, rate, events, csrf, seed, ack, java_402, timeout_ms,
                    max_interval_ms, wait_for_sessions, tls_cert, tls_key):
    """Serve simulated GWS notifications over CometD on 127.0.0.1 until interrupted.

    A GWS-like server for demos and tests: HTTP Basic auth for users agent-001.. (one password),
    GET /api/v2/me (with CSRF headers unless --no-csrf), GET /api/v2/me/workitems?fields=* (each
    agent's current workitems), and CometD long-polling (Bayeux 1.0, ack extension) at POST
    /api/v2/notifications, where each agent subscribes to its own /v2/me/workitems.  As a real
    CometD server, it keeps messages per session only: what is published while an agent has no
    subscribed session is lost, and a new handshake starts an empty session.  The notifications
    are those of `simulate --duplicate-rate 0` with the same --seed and --agents (without Bayeux
    ids), paced to --rate.  It listens on 127.0.0.1 only.

    \b
    Example:
      GWS_PASSWORD=s3cret workitem-store simulate-server --password-env GWS_PASSWORD \\
          --agents 5 --rate 50 --wait-for-sessions
    """
    import asyncio
    import os
    import ssl

    from .gws_simulator import GwsSimulator

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    ssl_context = None
    if tls_cert is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(tls_cert, tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise click.ClickException(f"cannot use {tls_cert} / {tls_key}: {exc}") from exc
    password = os.environ.get(password_env) if password_env else None
    told = f"from ${password_env}" if password else "demo" + (f" (${password_env} is unset or empty)" if password_env else "")
    password = password or "demo"

    async def serve():
        gws = GwsSimulator(agents=agents, password=password, port=port, rate=rate, events=events,
                           csrf=csrf, seed=seed, ack=ack, java_402=java_402, timeout=timeout_ms,
                           max_interval=max_interval_ms, ssl_context=ssl_context,
                           wait_for_sessions=wait_for_sessions)
        try:
            await gws.start()
        except OSError as exc:
            raise click.ClickException(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from exc
        click.echo(f"GWS simulator at {gws.url} (notifications: {gws.notifications_url}); users "
                   f"agent-001..agent-{agents:03d}, password {told}, "
                   f"CSRF {'on' if csrf else 'off'}, ack {ack}; Ctrl-C stops it")
        try:
            await asyncio.Event().wait()
        finally:
            await gws.stop()
            click.echo(f"published {sum(gws.published.values())} notifications "
                       f"({sum(gws.delivered.values())} delivered, {sum(gws.lost.values())} lost: "
                       f"no session listening)", err=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


CSV_HELP = ("Print CSV.  A text cell starting with =, +, -, @, tab or carriage return gets a ' in front "
            "(OWASP rule against spreadsheet formula injection); numbers are left as they are.")
RAW_CSV_HELP = "Print CSV with every cell as stored, without that ' (implies --csv)."


def _raw_csv_option(command):
    return click.option("--raw-csv", is_flag=True, help=RAW_CSV_HELP)(command)


def _output_options(command):
    command = _raw_csv_option(command)
    command = click.option("--csv", "fmt", flag_value="csv", help=CSV_HELP)(command)
    command = click.option("--json", "fmt", flag_value="json", help="Print JSON.")(command)
    return command


def _emit_rows(rows: list[dict], fmt: str | None, table_rows=None, columns=None, raw_csv: bool = False) -> None:
    """rows as JSON, CSV (formula-like cells neutralised unless raw_csv), or (default) a table for
    reading on a terminal (control characters shown escaped)."""
    if raw_csv:
        if fmt == "json":
            raise click.UsageError("--raw-csv is for CSV output, not --json")
        fmt = "csv"
    if fmt == "json":
        _echo_json(rows)
    elif fmt == "csv":
        import csv

        cell = (lambda v: v) if raw_csv else output.csv_cell
        header = columns or (list(rows[0]) if rows else [])
        writer = csv.writer(sys.stdout)
        writer.writerow([cell(k) for k in header])
        for row in rows:
            writer.writerow([cell(json.dumps(v, default=str) if isinstance(v, (dict, list)) else v)
                             for v in (row.get(k) for k in header)])
    else:
        from tabulate import tabulate

        table = table_rows if table_rows is not None else rows
        click.echo(tabulate([{output.safe_text(k): output.safe_cell(v) for k, v in row.items()} for row in table],
                            headers="keys"))


def _compact(value) -> str:
    return "" if value in (None, [], {}) else json.dumps(value, default=str, ensure_ascii=False)


@main.command()
@click.argument("workitem_id", type=UTF8_TEXT)
@_output_options
@db_option
def history(workitem_id, fmt, raw_csv):
    """The full audit trail of one workitem, from the log alone.

    Every log row about it, duplicates and quarantined rows included: seq, received_at, source,
    notification type, what it did (state change, capabilities granted and revoked, userData
    changes), its referenceId with that request's outcome, and errors.

    \b
    Example:
      workitem-store history 03W0GH2KD56YV000
      workitem-store history 03W0GH2KD56YV000 --csv > trail.csv
    """
    with db.snapshot(_query_engine()) as conn:
        trail = audit.history(conn, workitem_id)
    if not trail:
        raise click.ClickException(f"no log row mentions workitem {workitem_id!r}")
    table = [{
        "seq": e["seq"], "received_at": f"{e['received_at']:%Y-%m-%d %H:%M:%S.%f}", "source": e["source"],
        "type": e["notification_type"] or "", "status": e["status"],
        "state": f"{e['state_from'] or '-'} -> {e['state_to']}" if e["state_to"] else "",
        "granted": ",".join(e["capabilities_granted"]), "revoked": ",".join(e["capabilities_revoked"]),
        "request": f"{e['reference_id']} {e['request_outcome'] or ''}" if e["reference_id"] else "",
        "error": " ".join(str(v) for v in (e["error_code"], e["error_message"]) if v is not None),
        "userData": _compact(e["user_data_changes"]),
    } for e in trail]
    _emit_rows(trail, fmt, table, raw_csv=raw_csv)


@main.command()
@click.argument("workitem_id", type=UTF8_TEXT)
@click.option("--as-of", "as_of", metavar="TIMESTAMP", help="ISO-8601 instant (UTC unless it has an offset).")
@click.option("--seq", type=click.IntRange(min=0), help="Log position: the log cut at this seq.")
@_output_options
@db_option
def state(workitem_id, as_of, seq, fmt, raw_csv):
    """A workitem as it stood at a moment (--as-of) or log position (--seq), from the log alone.

    Replays the log rows about the workitem with the projections' rules: the same row the
    workitems table held then, plus the capabilities open at that point and since which seq.

    \b
    Example:
      workitem-store state 03W0GH2KD56YV000 --as-of 2026-11-02T10:42:00Z
      workitem-store state 03W0GH2KD56YV000 --seq 1500 --json
    """
    from .notifications import parse_timestamp

    if (as_of is None) == (seq is None):
        raise click.UsageError("give exactly one of --as-of TIMESTAMP or --seq N")
    try:
        at = parse_timestamp(as_of) if as_of is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--as-of") from exc
    with db.snapshot(_query_engine()) as conn:
        found = audit.state(conn, workitem_id, upto_seq=seq, as_of=at)
    if found is None:
        when = f"at seq {seq}" if seq is not None else f"as of {at.isoformat()}"
        raise click.ClickException(f"workitem {workitem_id!r} was not known {when}")
    if fmt or raw_csv:
        _emit_rows([found], fmt, raw_csv=raw_csv)
    else:
        from tabulate import tabulate

        click.echo(tabulate([(output.safe_text(k), output.safe_cell(_compact(v) if isinstance(v, (dict, list)) else v))
                             for k, v in found.items()], headers=["column", "value"]))


@main.command()
@click.argument("sql")
@click.option("--csv", "fmt", flag_value="csv", help=CSV_HELP)
@_raw_csv_option
@click.option("--json", "fmt", flag_value="json", help="Print a JSON array of objects.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60, show_default=True,
              metavar="SECONDS", help="Cancel the query after this many seconds.")
@click.option("--as", "as_role", metavar="ROLE", help="PostgreSQL: connect as ROLE instead of the --db URL's "
                                                      "user (same server and database).")
@click.option("--password-env", metavar="VAR", help="With --as: environment variable holding ROLE's password "
                                                     "(without it: none, e.g. trust or peer authentication).")
@db_option
def query(sql, fmt, raw_csv, timeout, as_role, password_env):
    """Run one read-only SQL query and print its rows (a table, --csv or --json).

    The SQL may come from anyone: on both engines it can only read, and it is cancelled after
    --timeout seconds.  SQLite: the file is opened read-only, and ATTACH, DETACH, PRAGMAs that
    write, creating, altering or dropping anything (TEMP objects and virtual tables too),
    writes, transactions and the functions load_extension, readfile, writefile, edit and
    fts3_tokenizer are refused.  PostgreSQL: the query is one statement in a read-only
    transaction, and it runs only as a role that can do nothing but read (a read-only
    transaction does not stop a superuser reading the server's files): refused are a
    superuser or CREATEROLE role, a member of pg_read_server_files, pg_write_server_files,
    pg_execute_server_program, pg_signal_backend or pg_write_all_data, and a role that owns
    or may write any table or view, or may CREATE in the database or one of its schemas, or
    create temporary tables.  `workitem-store grant-readonly ROLE --login` (run by the store's
    owner) makes a role that passes; connect as it with --as ROLE or a --db URL naming it.

    On a SQLite file the same is also at hand with sqlite-utils, e.g. `sqlite-utils query
    workitems.db "..." --csv` (without these fences).

    \b
    Example:
      workitem-store query "SELECT state, COUNT(*) AS n FROM workitems GROUP BY state" --csv
      workitem-store query "SELECT * FROM request_outcome_summary" --as analyst \\
          --db postgresql://postgres@db:5432/workitems
    """
    from .ingest.config import password_from_env

    target = click.get_current_context().obj
    if as_role:
        target = query_mod.url_as(target, as_role, password_from_env(password_env) if password_env else None)
    elif password_env:
        raise click.UsageError("--password-env goes with --as ROLE")
    engine = db.open_reader(target)
    try:
        with db.snapshot(engine) as conn:
            columns, rows = query_mod.run_query(conn, sql, timeout=timeout)
    finally:
        engine.dispose()
    _emit_rows([dict(zip(columns, row, strict=True)) for row in rows], fmt, columns=columns, raw_csv=raw_csv)


@main.command("grant-readonly")
@click.argument("role")
@click.option("--password-env", metavar="VAR", help="Environment variable holding the role's password "
                                                     "(the role can then log in).")
@click.option("--login", is_flag=True, help="Let the role log in (implied by --password-env); "
                                            "otherwise a new role cannot and an existing one keeps what it had.")
@click.option("--with-log", is_flag=True, help="Also let the role read event_log, event_log_counts, imported_files, "
                                                "projection_errors, seals and store_identity (auditors running "
                                                "history/state/verify/status/prove need them).")
@click.option("--keep-connect", metavar="PATTERN", multiple=True,
              help="Leave CONNECT on the other databases whose name matches PATTERN (shell-style, e.g. "
                   "postgres or 'reports_*') as it is: the role may still connect to them.  Repeatable.")
@db_option
def grant_readonly(role, password_env, login, with_log, keep_connect):
    """PostgreSQL: create (or update) ROLE that can only SELECT the projections and views.

    The role gets CONNECT on the store's database, USAGE on schema public and SELECT on the
    projections, the views, projection_checkpoints and alembic_version (event_log, event_log_counts,
    imported_files, projection_errors, seals and store_identity too with --with-log), nothing else; it is
    NOSUPERUSER NOCREATEDB NOCREATEROLE: a role that `query` accepts.

    PostgreSQL lets every role (PUBLIC) create temporary tables in, and connect to, any new
    database.  So that ROLE can do neither, this also changes what other roles may do, and
    prints each change: TEMPORARY on the store's database is revoked from PUBLIC (its owner
    and superusers keep it), and CONNECT on every other database ROLE could connect to is
    revoked from PUBLIC and from ROLE, except those matching --keep-connect.  Other roles that
    use those databases then need CONNECT granted by name.  A database created later gives
    PUBLIC CONNECT again: run this command again then.  Only a database's owner or a
    superuser can revoke on it: what could not be revoked is printed as a warning.

    For SQLite there is nothing to grant: query opens the file read-only and refuses anything
    but reading.

    \b
    Example:
      ANALYST_PW=... workitem-store grant-readonly analyst --password-env ANALYST_PW \\
          --db postgresql://postgres@db:5432/workitems --keep-connect postgres
    """
    from .ingest.config import password_from_env

    password = password_from_env(password_env) if password_env else None
    engine = db.open_engine(click.get_current_context().obj)
    if engine.dialect.name != "postgresql":  # before anything is created at a SQLite path
        raise click.ClickException("grant-readonly is for PostgreSQL; SQLite query commands open the file read-only")
    db.ensure_schema(engine)
    g = query_mod.grant_readonly(engine, role, password=password, login=login, with_log=with_log,
                          keep_connect=keep_connect)
    click.echo(f"role {role} may SELECT: {', '.join(g.relations)}; it cannot write")
    if g.temp_revoked:
        click.echo(f"revoked TEMPORARY on database {g.database} from PUBLIC: only its owner and superusers "
                   "can create temporary tables there now")
    if g.connect_revoked:
        click.echo(f"revoked CONNECT from PUBLIC and from {role} on database(s) {', '.join(g.connect_revoked)}: "
                   "only their owners, superusers and roles granted CONNECT by name can connect to them now")
    if g.kept:
        click.echo(f"{role} can still connect to (--keep-connect): {', '.join(g.kept)}")
    if g.not_revoked:
        click.echo(f"warning: {role} can still connect to {', '.join(g.not_revoked)}: only a database's owner "
                   "or a superuser can revoke CONNECT on it", err=True)
    if g.can_temp:
        click.echo(f"warning: {role} can still create temporary tables in {g.database} (only its owner or a "
                   "superuser can revoke TEMPORARY on it): `query` will refuse the role", err=True)


DEMO_QUERIES = {
    "workitems by state": "SELECT state, COUNT(*) AS workitems FROM workitems GROUP BY state ORDER BY 2 DESC",
    "failed requests by error code": (
        "SELECT error_code, COUNT(*) AS requests FROM request_outcomes WHERE outcome = 'failed' "
        "GROUP BY error_code ORDER BY 2 DESC"),
    "most frequent transitions": (
        "SELECT from_state, to_state, COUNT(*) AS n FROM workitem_transitions "
        "GROUP BY from_state, to_state ORDER BY 3 DESC LIMIT 5"),
}


@main.command()
@click.option("--seconds", type=click.FloatRange(min=1), default=5, show_default=True,
              help="How long the simulated GWS server publishes.")
@click.option("--agents", type=click.IntRange(min=1), default=5, show_default=True,
              help="Simulated agents: one GWS session (and source) each.")
@click.option("--rate", type=click.FloatRange(min=1), default=400, show_default=True,
              help="Notifications per second the simulator publishes (all agents together).")
@db_option
def demo(seconds, agents, rate):
    """Live demo: a simulated GWS server, a live ingest of its agents, then what was stored.

    Starts the GWS simulator on loopback (Basic auth, CSRF, CometD with the ack extension),
    follows every agent's /v2/me/workitems with `ingest`'s own code for a few seconds (the
    simulator publishes once every agent's session listens), waits until everything published
    is stored, then verifies the store and answers a few questions in SQL.  Uses the same database as every command (--db, $WORKITEM_STORE_URL, else
    workitems.db); a later run adds sessions of its own (sources agent-001#2, ...).

    \b
    Example:
      workitem-store demo --seconds 10 --agents 20
    """
    import asyncio
    import time

    from sqlalchemy import func, select, text

    from .ingest.config import SessionConfig
    from .gws_simulator import GwsSimulator
    from .ingest.service import Ingestor
    from .schema import event_log

    engine = _engine()
    with engine.connect() as conn:
        run = 1 + conn.execute(select(func.count(func.distinct(event_log.c.source)))
                               .where(event_log.c.source.like("agent-001%"))).scalar_one()
    click.echo(f"database: {engine.url.render_as_string(hide_password=True)}")

    async def live():
        events = max(1, int(seconds * rate))
        # Publishing starts once every agent's session listens: a CometD server keeps nothing for
        # a session that does not exist yet, so an earlier start would lose the first messages.
        async with GwsSimulator(agents=agents, rate=rate, events=events, seed=run, csrf=True,
                                wait_for_sessions=True) as server:
            click.echo(f"GWS simulator at {server.url}: {agents} agents, {events} notifications at {rate:g}/s")
            configs = [SessionConfig(server.url, name, server.password, name if run == 1 else f"{name}#{run}")
                       for name in server.agents]
            ingestor = Ingestor(engine, configs)
            following = asyncio.create_task(ingestor.run())
            finished = asyncio.create_task(server.finished.wait())
            await asyncio.wait([finished, following], return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()

            def storable():  # published minus what no session could have stored
                return sum(server.published[n] - server.lost[n] - server.discarded[n] for n in server.agents)

            deadline = time.monotonic() + 30
            while (sum(s.stats.appended for s in ingestor.sessions) < storable()
                   and time.monotonic() < deadline and not following.done()):
                await asyncio.sleep(0.05)  # polling the counters, with a deadline
            ingestor.stop()
            await following
            return server, ingestor

    server, ingestor = asyncio.run(live())
    for s in ingestor.sessions:
        name = s.config.user
        lost = server.lost[name] + server.discarded[name]
        click.echo(f"  {s.source}: {server.published[name]} published, {s.stats.appended} stored, "
                   f"{s.client.handshakes} handshake(s)"
                   + (f", {lost} lost (no session listening, or lost with a session)" if lost else ""))
    with db.snapshot(engine) as conn:
        report = verify_mod.verify(conn)
        click.echo(f"verify: chain {'ok' if report.chain_break is None else 'BROKEN'}, projections "
                   f"{'equal a rebuild' if not report.differences else 'DIFFER'}; chain head {report.head_hash}")
        for title, sql in DEMO_QUERIES.items():
            click.echo(f"\n-- {title}\n{sql};")
            for row in conn.execute(text(sql)):
                click.echo("   " + " | ".join("" if v is None else output.safe_text(v) for v in row))
    shell = f"sqlite3 {engine.url.database}" if engine.dialect.name == "sqlite" else "psql"
    click.echo(f"\nQuery it yourself with {shell} (every table: docs/SQL.md), or run `workitem-store status`.")


@main.command()
@click.option("--events", type=click.IntRange(min=100), default=100_000, show_default=True,
              help="Number of simulated notifications (50 agents, seed 42, with duplicates and noise).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Directory for the JSONL stream and the SQLite files, in a temporary directory "
                   "removed at the end; created if missing (its parent must exist).  Default: the "
                   "system's temporary directory.")
@click.option("--db", "db_url", metavar="URL", default=None,
              help="Run on PostgreSQL instead of SQLite: the server of this URL gets throwaway "
                   "databases (the role needs CREATEDB), dropped at the end; the URL's own database "
                   "is only connected to.  A PostgreSQL URL only (also accepted before the command "
                   "name); without it the bench runs on SQLite files, whatever $WORKITEM_STORE_URL says.")
@click.option("--steps", metavar="STEP,...", default=None,
              help="Run only these steps (append, import, project, rebuild, verify-chain, verify, audit, "
                   "raw) and those they need.  Default: all.")
def bench(events, workdir, db_url, steps):
    """Measure the store's rates, memory and audit latency against raw inserts, in one run.

    Simulates --events notifications into a JSONL file, then runs each step in a process of its
    own and prints its line as soon as it finishes: log rows per second, seconds, and the peak
    RSS of that process.

    \b
    Steps:
      append   import --no-project into a fresh store: read, parse, classify, hash, insert
      raw      the baseline: the rows append produced, finished (seq, hashes and all), inserted
               with no store code into event_log of another fresh store, one transaction:
               sqlite3.executemany on SQLite, psycopg COPY event_log FROM STDIN on PostgreSQL
      import   import into a fresh store: append, then project (what a user waits for)
      project  incremental project from empty over the log append left
      rebuild  every projection recomputed from seq 1
      verify-chain
               the chain part of verify alone (payload hashes, links, counts) over the log
               append left; then, timed apart on the same line, the extracted columns check
      verify   full verify: hash chain, extracted columns, counts, projections compared with
               a rebuild
      audit    history and state --as-of of 5 sampled workitems: median and max of 50 calls
               each after a warm-up (library calls in one snapshot each, no process start-up)

    A ratio such as "append / raw insert: 0.52x" is append's rate divided by the baseline's:
    the share of the time that is the database writing the rows; the rest is the store's own
    work.  Last come the goals, each marked ok or MISSED: rebuild >= 50,000 events/s; append >=
    0.45x raw insert and import >= 25,000 events/s on SQLite; append >= 0.4x raw COPY on
    PostgreSQL; peak RSS < 500 MB in each store step; history and state median < 5 ms; on SQLite
    the chain part of verify >= 300,000 events/s and full verify >= 50,000 events/s.

    \b
    Example:
      workitem-store bench --events 200000
      workitem-store bench --events 50000 --db postgresql://postgres@127.0.0.1:5432/postgres
      workitem-store bench --events 1000000 --steps append,raw
    """
    from .bench import parse_steps, run

    try:
        chosen = parse_steps(steps)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--steps") from exc
    with _errors():
        group_db = click.get_current_context().obj
        for line in run(events, workdir, db_url or (group_db if isinstance(group_db, str) else None), chosen):
            click.echo(line)

if __name__ == "__main__":
    main()
