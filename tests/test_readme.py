"""README.md's shell commands, run as written, in order, in one fresh directory.

Every ```sh block of the README is run command by command (continuation lines joined) with the
package's console script on the PATH, except the commands that need a GWS or run until stopped
(``ingest``, ``simulate-server``, ``project --follow``): their number is asserted, so a new
command is never skipped unnoticed.  What a reader must supply is supplied, and nothing else:

- ``postgresql://...`` is a database of a PostgreSQL server of this test alone (made a store
  first, as a reader would): ``grant-readonly`` as written revokes CONNECT on every other
  database of the server, which must not touch the server the other tests share;
- ``/etc/workitem-store/`` and ``/mnt/worm/`` are directories under the test's folder;
- ``more.jsonl`` (piped into ``import -``) holds the API reference's example notification, in an
  envelope received at 10:41 on the day the simulated stream starts: the audit examples find its
  workitem ``03W0GH2KD56YV000`` as of 10:42; ``capture.jsonl`` holds it received again at 10:45;
- ``--events 100000`` becomes ``--events 3000`` (the commands are the same; CI time is not).

The README's first line ends in the demo, ``.venv/bin/workitem-store demo``: it runs as written in
a directory whose ``.venv`` is this test's virtual environment, and the command its closing hint
prints runs too, as printed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NEEDS_GWS = re.compile(r"workitem-store (ingest|simulate-server)\b|--follow\b")
SKIPPED = 5  # the live-ingest block's four commands and the seal block's `ingest`

EXAMPLE = {"received_at": "2026-11-02T10:41:00Z", "source": "agent7", "message": {"data": {"workitem": {
    "state": "Processing",
    "capabilities": ["Transfer", "AttachUserData", "UpdateUserData", "DeleteUserData", "SetInFocus", "Complete"],
    "id": "03W0GH2KD56YV000", "workitemType": "Inbound",
    "uri": "http://10.10.15.212:9090/api/v2/workitems/03W0GH2KD56YV000"},
    "referenceId": 8, "notificationType": "StatusChange", "messageType": "WorkitemStateChangeMessage"}}}


def first_line_demo() -> str:
    """The last command of the README's first line (after the venv is made and installed)."""
    first = next(line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("    "))
    return first.split(" && ")[-1]


def readme_commands() -> list[str]:
    """The commands of README.md's ```sh blocks, in order, continuation lines joined."""
    commands, block = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if block is None:
            if line.strip() == "```sh":
                block = []
            continue
        if line.strip() == "```":
            commands += [c for c in "\n".join(block).replace("\\\n", " ").splitlines() if c.strip()]
            block = None
        else:
            block.append(line)
    return commands


def as_run_here(command: str, pg_url: str, tmp: Path) -> str:
    return (command.replace("postgresql://...", pg_url)
            .replace("/etc/workitem-store/", f"{tmp}/etc/")
            .replace("/mnt/worm/", f"{tmp}/worm/")
            .replace("--events 100000", "--events 3000"))


def test_every_readme_command_runs_as_written(tmp_path, private_postgres):
    pg_url = private_postgres.create_database("readme")
    commands = readme_commands()
    assert len(commands) > 20, "README.md's ```sh blocks were not found"
    (tmp_path / "etc").mkdir()
    (tmp_path / "worm").mkdir()
    (tmp_path / "more.jsonl").write_text(json.dumps(EXAMPLE) + "\n")
    (tmp_path / "capture.jsonl").write_text(json.dumps({**EXAMPLE, "received_at": "2026-11-02T10:45:00Z"}) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKITEM_STORE_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"

    def sh(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", "set -eo pipefail; " + command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    sh(f"workitem-store init --db {pg_url} && workitem-store import more.jsonl --db {pg_url}").check_returncode()
    skipped = []
    for command in commands:
        if NEEDS_GWS.search(command):
            skipped.append(command)
            continue
        done = sh(as_run_here(command, pg_url, tmp_path))
        assert done.returncode == 0, f"README command failed: {command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr, command
    assert len(skipped) == SKIPPED, skipped
    history = json.loads(sh("workitem-store history 03W0GH2KD56YV000 --json").stdout)
    assert [row["source"] for row in history][:1] == ["agent7"]  # what more.jsonl brought is found


def test_the_demo_and_its_hint_run_as_printed(tmp_path):
    demo = first_line_demo()
    assert demo == ".venv/bin/workitem-store demo"
    (tmp_path / ".venv").symlink_to(BIN.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKITEM_STORE_")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != BIN)  # as after line 1

    def sh(command: str) -> str:
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (command, done.stdout, done.stderr)
        return done.stdout

    hint = sh(demo).strip().splitlines()[-1]
    (command,) = re.findall(r"`([^`]+)`", hint)
    assert command.startswith(".venv/bin/workitem-store status"), hint
    assert "chain head" in sh(command)
