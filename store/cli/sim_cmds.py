"""Made-up notifications and measurements: simulate, simulate-server, bench."""

from __future__ import annotations

import os

import click

from .. import bench as bench_mod
from ..simulate import FORMATS
from ..simulate import simulate as simulate_lines
from .common import FORCE_HELP, OUTPUT_HELP, TIMESTAMP, TIMESTAMP_FORMS, db_target, output_file


@click.command()
@click.option("--events", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Number of lines to write.")
@click.option("--agents", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of agents; each is one source (session).")
@click.option("--seed", type=int, default=1, show_default=True, help="Random seed: same seed, same stream.")
@click.option("--start", type=TIMESTAMP, default="2026-11-02T08:00:00Z", show_default=True,
              help=f"Timestamp of the first notification: {TIMESTAMP_FORMS}.")
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
    lines = simulate_lines(events, agents=agents, seed=seed, fmt=fmt, start=start, error_rate=error_rate,
                           duplicate_rate=duplicate_rate, noise_rate=noise_rate)
    with output_file(output_path, force) as out:
        for line in lines:
            out.write(line + "\n")


@click.command("simulate-server")
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
    ids), paced to --rate.  It listens on 127.0.0.1 only; SIGINT (Ctrl-C) or SIGTERM stops it.

    \b
    Example:
      GWS_PASSWORD=s3cret workitem-store simulate-server --password-env GWS_PASSWORD \\
          --agents 5 --rate 50 --wait-for-sessions
    """
    # The simulator imports aiohttp: only when it runs, so that every other command (and
    # --help) starts without it.
    from .. import demo as demo_mod

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    password = os.environ.get(password_env) if password_env else None
    told = f"from ${password_env}" if password else "demo" + (f" (${password_env} is unset or empty)"
                                                               if password_env else "")

    def listening(gws) -> None:
        click.echo(f"GWS simulator at {gws.url} (notifications: {gws.notifications_url}); users "
                   f"agent-001..agent-{agents:03d}, password {told}, "
                   f"CSRF {'on' if csrf else 'off'}, ack {ack}; Ctrl-C stops it")

    counts = demo_mod.serve_simulator(
        port=port, agents=agents, password=password or "demo", tls_cert=tls_cert, tls_key=tls_key,
        on_listening=listening, rate=rate, events=events, csrf=csrf, seed=seed, ack=ack, java_402=java_402,
        timeout=timeout_ms, max_interval=max_interval_ms, wait_for_sessions=wait_for_sessions)
    click.echo(f"published {counts.published} notifications ({counts.delivered} delivered, {counts.lost} lost: "
               "no session listening)", err=True)


def _steps(_ctx, _param, value: str | None) -> tuple[str, ...]:
    try:
        return bench_mod.parse_steps(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command()
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
@click.option("--steps", metavar="STEP,...", default=None, callback=_steps,
              help="Run only these steps (append, import, project, rebuild, verify-chain, verify, audit, "
                   "raw, raw-projections, raw-chain, forget) and those they need.  Default: all.")
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
      raw-projections
               the baseline of project and rebuild: the rows the rebuild wrote, inserted with
               no store code into the projection tables of another fresh store, one
               transaction (executemany on SQLite, COPY on PostgreSQL)
      verify-chain
               the chain part of verify alone (payload hashes, links, counts) over the log
               append left; then, timed apart on the same line, the extracted columns check
      raw-chain
               the baseline of verify-chain: the same payload and link hashes computed and
               compared with no store code (rows read by the driver, one process)
      verify   full verify: hash chain, extracted columns, counts, projections compared with
               a rebuild
      audit    history and state --as-of of 5 sampled workitems: median and max of 50 calls
               each after a warm-up (library calls in one snapshot each, no process start-up)
      forget   forget --received-before (retention) over the whole log, then again

    A ratio such as "append / raw insert: 0.52x" is append's rate divided by the baseline's:
    the share of the time that is the database writing the rows; the rest is the store's own
    work.  "rebuild / raw insert of the projection rows it writes" is the same for the
    projections; the two baselines one after the other bound what import can reach on the
    machine; "verify-chain / the chain checked with no store code" is how close the chain check
    comes to the plainest code doing the same hashing.  Last come the goals, each marked ok or
    MISSED: rebuild >= 50,000 events/s; append >= 0.45x raw insert and import >= 25,000
    events/s on SQLite; append >= 0.4x raw COPY on PostgreSQL; peak RSS < 500 MB in each store
    step; history and state median < 5 ms; on SQLite the chain part of verify >= 300,000
    events/s and full verify >= 50,000 events/s.

    \b
    Example:
      workitem-store bench --events 200000
      workitem-store bench --events 50000 --db postgresql://postgres@127.0.0.1:5432/postgres
      workitem-store bench --events 1000000 --steps append,raw
    """
    for line in bench_mod.run(events, workdir, db_url or db_target(), steps):
        click.echo(line)
