"""Live notifications: ingest (the service) and demo (a simulated GWS followed live)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import click

from .. import db, output, seals
from ..db import StoreError
from ..ingest import config as config_mod
from .common import ByteSize, db_option, db_target, writer_engine
from .formatting import NULL, say, seal_line


@click.command()
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
@click.option("--redact-keys", metavar="K1,K2", envvar=config_mod.REDACT_KEYS_ENV,
              help="Replace the values of these userData keys by the redaction marker before the rows are "
                   f"written to the log (recorded in redactions); default ${config_mod.REDACT_KEYS_ENV}, else the "
                   "config file's redact_keys.")
@click.option("-v", "--verbose", is_flag=True, help="Log each appended batch.")
@db_option
def ingest(gws_url, user, password_env, source, config_path, ca_file, client_cert, client_key, proxy,
           notifications_path, spool_dir, spool_max, metrics_port, no_project, seal_key, witness, seal_every,
           redact_keys, verbose):
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
    witness = "/mnt/worm/seals.jsonl", seal_every = 600; and the userData keys redacted before
    anything is written to the log: redact_keys = ["CardNumber"].

    \b
    Example:
      AGENT1_PW=... workitem-store ingest --gws-url https://gws.example.com \\
          --user agent1 --password-env AGENT1_PW --metrics-port 9108
      workitem-store ingest --config agents.toml --db postgresql://ingest@db:5432/workitems \\
          --spool /var/spool/workitem-store --spool-max 2G
    """
    # The service imports aiohttp: only when it runs, so that every other command (and --help)
    # starts without it.
    from ..ingest import service

    if config_path and (user or password_env or source):
        raise click.UsageError("give either --config or --user/--password-env/--source, not both")
    if not config_path and not (gws_url and user and password_env):
        raise click.UsageError("give --gws-url, --user and --password-env (or --config FILE.toml)")
    configs = config_mod.load_sessions(config_path, gws_url=gws_url, user=user, password_env=password_env,
                                       source=source, ca_file=ca_file, client_cert=client_cert,
                                       client_key=client_key, proxy=proxy, notifications_path=notifications_path)
    sealing = config_mod.load_sealing_options(config_path, seal_key, witness, seal_every)
    keys = config_mod.load_redact_keys(config_path, redact_keys)
    service.configure_logging(verbose)
    ingestor, errors = service.run(writer_engine(), configs, project=not no_project, metrics_port=metrics_port,
                                   spool_dir=spool_dir, spool_max=spool_max, sealing=sealing, redact_keys=keys)
    for s in ingestor.sessions:
        say(f"{s.source}: {s.stats.received} received, {s.stats.stored} stored, {s.stats.appended} appended, "
            f"{s.stats.duplicates} duplicate, {s.stats.quarantined} quarantined, "
            f"{s.client.handshakes} handshakes, {s.client.reconnects} reconnects, {s.stats.snapshots} snapshots")
    if ingestor.last_projected_seq is not None:
        click.echo(f"projections up to date at seq {ingestor.last_projected_seq}")
    if sealing is not None:
        click.echo(f"{ingestor.seals_made} seals made, {ingestor.seal_failures} failed")
        if ingestor.last_seal is not None:
            click.echo(seal_line(ingestor.last_seal))
        if ingestor.seal_error is not None:
            click.echo(f"the last seal failed: {output.safe_text(ingestor.seal_error)} (seal the log's head by "
                       "hand: `workitem-store seal`)", err=True)
    if ingestor.writer.spool_bytes():
        click.echo(f"{ingestor.writer.spool_bytes()} bytes stay in the spool {ingestor.spool.directory}: "
                   "the next `ingest` on this store drains them first", err=True)
    if errors and not ingestor.stopped_by_request:
        raise StoreError("; ".join(f"{name}: {exc}" for name, exc in errors))


@click.command()
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
    is stored, then verifies the store and answers a few questions in SQL.  Uses the same
    database as every command (--db, $WORKITEM_STORE_URL, else workitems.db); a later run adds
    sessions of its own (sources agent-001#2, ...).

    \b
    Example:
      workitem-store demo --seconds 10 --agents 20
    """
    # The demo runs the simulator and the ingest service, which import aiohttp: only when it
    # runs, so that every other command (and --help) starts without it.
    from .. import demo as demo_mod

    engine = writer_engine()
    click.echo(f"database: {engine.url.render_as_string(hide_password=True)}")
    result = demo_mod.run(engine, seconds=seconds, agents=agents, rate=rate, on_start=lambda url, events: click.echo(
        f"GWS simulator at {url}: {agents} agents, {events} notifications at {rate:g}/s"))
    for a in result.agents:
        say(f"  {a.source}: {a.published} published, {a.stored} stored, {a.handshakes} handshake(s)"
            + (f", {a.lost} lost (no session listening, or lost with a session)" if a.lost else ""))
    report = result.verify
    click.echo(f"verify: chain {'ok' if report.chain_break is None else 'BROKEN'}, projections "
               f"{'equal a rebuild' if not report.differences else 'DIFFER'}; chain head {report.head_hash}")
    for answer in result.answers:
        click.echo(f"\n-- {answer.title}\n{answer.sql};")
        for row in answer.rows:
            say("   " + " | ".join(NULL if v is None else str(v) for v in row))
    shell = f"sqlite3 {shlex.quote(engine.url.database or '')}" if engine.dialect.name == "sqlite" else "psql"
    target = db_target()
    again = invocation() + " status" + (f" --db {shlex.quote(db.safe_url(target))}" if target else "")
    click.echo(f"\nQuery it yourself with {shell} (every table: docs/SQL.md), or run `{again}`.")


def invocation(argv0: str | None = None, executable: str | None = None) -> str:
    """This program's command as the user would type it again: ``workitem-store`` when that is
    on the PATH, else the path it was started by (``.venv/bin/workitem-store``), or
    ``<python> -m store`` when started so."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if Path(argv0).name == "__main__.py":  # python -m store
        return f"{_as_typed(executable or sys.executable)} -m {__name__.split('.')[0]}"
    return _as_typed(argv0)


def _as_typed(path: str) -> str:
    """``path`` of a program, shortest as typed: its name when the PATH finds this very file,
    else relative to the working directory when under it, else as it is."""
    name = os.path.basename(path)
    found = shutil.which(name)
    try:
        if found is not None and os.path.samefile(found, path):
            return shlex.quote(name)
    except OSError:
        pass
    if os.path.isabs(path):
        relative = os.path.relpath(path)
        if not relative.startswith(os.pardir):
            path = relative if os.sep in relative else os.path.join(os.curdir, relative)
    return shlex.quote(path)
