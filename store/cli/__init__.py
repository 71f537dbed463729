"""The ``workitem-store`` command line: parse options, call the library, format the results.

One module per group of commands; ``common`` holds what they share, among it the one place
where errors become messages (``StoreGroup``), ``formatting`` how results are shown.
"""

from __future__ import annotations

import click

from . import audit_cmds, erasure_cmds, ingest_cmds, seal_cmds, sim_cmds, store_cmds
from .common import StoreGroup


@click.group(cls=StoreGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--db", "db_url", metavar="URL|PATH", default=None,
              help="Database for the command (see any command's --help).")
@click.version_option(package_name="workitem-store")
@click.pass_context
def main(ctx, db_url):
    """Event-sourced store for Genesys Web Services workitem notifications.

    Every notification is appended, raw and unmodified, to the append-only table event_log;
    projections (workitems, workitem_transitions, capability_history, request_outcomes) are
    derived from it and can always be rebuilt.  The database is --db (a SQLAlchemy URL or a
    SQLite file path), else $WORKITEM_STORE_URL, else sqlite:///workitems.db.

    Errors are one line on standard error, "Error: ...", with exit status 1 (2 for a command
    line that is wrong).  Timestamps are printed as ISO 8601 UTC with Z
    (2026-11-02T08:00:00.123456Z) and read in that form, with +00:00 or another offset, or a
    space for the T (without a zone: UTC).

    \b
    Example:
      workitem-store simulate --events 5000 > stream.jsonl
      workitem-store import stream.jsonl
      workitem-store status
    """
    ctx.obj = db_url


COMMANDS = (
    store_cmds.init, store_cmds.import_cmd, store_cmds.project, store_cmds.rebuild, store_cmds.status,
    store_cmds.export_cmd,
    ingest_cmds.ingest, ingest_cmds.demo,
    audit_cmds.history, audit_cmds.state, audit_cmds.query, audit_cmds.grant_readonly,
    audit_cmds.datasette_cmd,
    seal_cmds.verify, seal_cmds.keygen, seal_cmds.seal, seal_cmds.prove, seal_cmds.check_proof,
    sim_cmds.simulate, sim_cmds.simulate_server, sim_cmds.bench,
    erasure_cmds.forget,
)
for _command in COMMANDS:
    main.add_command(_command)
