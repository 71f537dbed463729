"""Reading the store: history and state of one workitem, anyone's SQL, and the role it runs as."""

from __future__ import annotations

from pathlib import Path

import click

from .. import audit, datasette, db
from .. import query as query_mod
from ..db import StoreError
from ..ingest.config import password_from_env
from ..notifications import utc_text
from .common import (
    FORCE_HELP,
    TIMESTAMP,
    TIMESTAMP_FORMS,
    UTF8_TEXT,
    db_option,
    db_target,
    output_file,
    reader_engine,
)
from .formatting import CSV_HELP, compact, emit_rows, output_format, output_options, raw_csv_option, table


@click.command()
@click.argument("workitem_id", type=UTF8_TEXT)
@output_options
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
    fmt = output_format(fmt, raw_csv)
    with db.snapshot(reader_engine()) as conn:
        trail = audit.history(conn, workitem_id)
    if not trail:
        raise StoreError(f"no log row mentions workitem {workitem_id!r}")
    shown = [{
        "seq": e["seq"], "received_at": utc_text(e["received_at"]), "source": e["source"],
        "type": e["notification_type"], "status": e["status"],
        "state": f"{e['state_from'] or '-'} -> {e['state_to']}" if e["state_to"] else "",
        "granted": ",".join(e["capabilities_granted"]), "revoked": ",".join(e["capabilities_revoked"]),
        "request": f"{e['reference_id']} {e['request_outcome'] or ''}" if e["reference_id"] else "",
        "error": " ".join(str(v) for v in (e["error_code"], e["error_message"]) if v is not None),
        "userData": compact(e["user_data_changes"]) or "",  # (no change: nothing to show)
    } for e in trail]
    emit_rows(trail, fmt, shown, raw_csv=raw_csv)


@click.command()
@click.argument("workitem_id", type=UTF8_TEXT)
@click.option("--as-of", "as_of", type=TIMESTAMP, metavar="TIMESTAMP", help=f"The instant: {TIMESTAMP_FORMS}.")
@click.option("--seq", type=click.IntRange(min=0), help="Log position: the log cut at this seq.")
@output_options
@db_option
def state(workitem_id, as_of, seq, fmt, raw_csv):
    """A workitem as it stood at a moment (--as-of) or log position (--seq), from the log alone.

    Replays the log rows about the workitem with the projections' rules: the same row the
    workitems table held then, plus the capabilities open at that point and since which seq.
    In the table, NULL is a column without a value (JSON: null), apart from [] (an empty list).

    \b
    Example:
      workitem-store state 03W0GH2KD56YV000 --as-of 2026-11-02T10:42:00Z
      workitem-store state 03W0GH2KD56YV000 --seq 1500 --json
    """
    if (as_of is None) == (seq is None):
        raise click.UsageError("give exactly one of --as-of TIMESTAMP or --seq N")
    fmt = output_format(fmt, raw_csv)
    with db.snapshot(reader_engine()) as conn:
        found = audit.state(conn, workitem_id, upto_seq=seq, as_of=as_of)
    if found is None:
        when = f"at seq {seq}" if seq is not None else f"as of {utc_text(as_of)}"
        raise StoreError(f"workitem {workitem_id!r} was not known {when}")
    if fmt:
        emit_rows([found], fmt, raw_csv=raw_csv)
    else:
        click.echo(table(list(found.items()), ["column", "value"]))


@click.command()
@click.argument("sql")
@click.option("--csv", "fmt", flag_value="csv", help=CSV_HELP)
@raw_csv_option
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

    In the table, NULL is shown as NULL and a timestamp value (PostgreSQL's timestamptz) as
    ISO 8601 UTC with Z; SQLite returns the stored text of a timestamp as it is.

    On a SQLite file the same is also at hand with sqlite-utils, e.g. `sqlite-utils query
    workitems.db "..." --csv` (without these fences).

    \b
    Example:
      workitem-store query "SELECT state, COUNT(*) AS n FROM workitems GROUP BY state" --csv
      workitem-store query "SELECT * FROM request_outcome_summary" --as analyst \\
          --db postgresql://postgres@db:5432/workitems
    """
    fmt = output_format(fmt, raw_csv)
    target = db_target()
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
    emit_rows([dict(zip(columns, row, strict=True)) for row in rows], fmt, columns=columns, raw_csv=raw_csv)


@click.command("grant-readonly")
@click.argument("role")
@click.option("--password-env", metavar="VAR", help="Environment variable holding the role's password "
                                                     "(the role can then log in).")
@click.option("--login", is_flag=True, help="Let the role log in (implied by --password-env); "
                                            "otherwise a new role cannot and an existing one keeps what it had.")
@click.option("--with-log", is_flag=True, help="Also let the role read event_log, event_log_counts, imported_files, "
                                                "projection_errors, redactions, seals and store_identity "
                                                "(auditors running history/state/verify/status/prove need them).")
@click.option("--keep-connect", metavar="PATTERN", multiple=True,
              help="Leave CONNECT on the other databases whose name matches PATTERN (shell-style, e.g. "
                   "postgres or 'reports_*') as it is: the role may still connect to them.  Repeatable.")
@db_option
def grant_readonly(role, password_env, login, with_log, keep_connect):
    """PostgreSQL: create (or update) ROLE that can only SELECT the projections and views.

    The role gets CONNECT on the store's database, USAGE on schema public and SELECT on the
    projections, the views, projection_checkpoints and alembic_version (event_log, event_log_counts,
    imported_files, projection_errors, redactions, seals and store_identity too with --with-log), nothing
    else; it is
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
    password = password_from_env(password_env) if password_env else None
    g = query_mod.grant_readonly(db.open_engine(db_target()), role, password=password, login=login,
                                 with_log=with_log, keep_connect=keep_connect)
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


@click.command("datasette")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), metavar="FILE", default=None,
              help="Where to write the metadata (default: STEM-metadata.json in the current directory, STEM "
                   "being the store file's name without its suffix).")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@db_option
def datasette_cmd(output_path, force):
    """Write Datasette metadata for a SQLite store file, then print the command that browses it.

    The metadata describes every table, view and column (from docs/SQL.md) and offers the
    example queries of docs/SQL.md as canned queries.  Datasette applies it by the database's
    name, which is the file's stem: generate it for each store file you browse.  The store must
    exist; it is only read.

    \b
    Example:
      workitem-store datasette --db workitems.db -o metadata.json
      datasette workitems.db -m metadata.json      # (pip install datasette)
    """
    store_file = datasette.store_file(db.resolve_url(db_target()))
    reader_engine().dispose()  # a missing file is an error here, never created
    output_path = output_path or f"{Path(store_file).stem}-metadata.json"
    with output_file(output_path, force) as out:
        out.write(datasette.render(store_file))
    click.echo(datasette.command_line(store_file, output_path))
