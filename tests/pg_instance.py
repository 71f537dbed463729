"""A private, throw-away PostgreSQL server for tests that stop, kill or restart a database.

What it runs: a real PostgreSQL cluster made by the machine's own binaries
(``/usr/lib/postgresql/<version>/bin/initdb`` and ``pg_ctl``; the highest installed version is
found at run time) in a fresh temporary directory:

    <tmp>/wis-pg-XXXX/data   the cluster (PGDATA), made by ``initdb --no-sync -A trust -U postgres``
    <tmp>/wis-pg-XXXX/run    its Unix socket directory
    <tmp>/wis-pg-XXXX/server.log   the server's log (``pg_ctl -l``), shown in error messages

It listens on 127.0.0.1 only, on a free TCP port picked by the OS, with ``trust`` authentication
for the ``postgres`` role.  It is started and stopped with ``pg_ctl -D <that data directory>``
and nothing else: the shared server at 127.0.0.1:5432 (the one ``tests/conftest.py`` uses) is
never stopped or touched, and port 5432 is refused outright.

PostgreSQL refuses to run as root, and the tests (and CI) run as root: as root every ``initdb``
and ``pg_ctl`` runs as the ``postgres`` OS user through ``runuser -u postgres --``, and the
temporary directory is owned by that user.  As any other user they run directly.

Speed, not durability: ``initdb --no-sync`` and the settings ``fsync = off``,
``synchronous_commit = off`` and ``full_page_writes = off`` make it start in about a second and
restart in a fraction of one.  A crash of the *machine* could corrupt such a cluster; a crash or
``stop("immediate")`` of the *server* cannot (PostgreSQL's crash recovery still runs), so fault
tests see real PostgreSQL behaviour.  Never use these settings for data that matters.

Usage::

    from pg_instance import PrivatePostgres  # (the private_postgres fixture: conftest.py)

    def test_outage(private_postgres):
        url = private_postgres.create_database("store")  # or private_postgres.url
        ...
        private_postgres.stop("immediate")   # or "fast" (the default) / "smart"
        assert not private_postgres.running
        private_postgres.start()             # same port, same data, same URL

    with PrivatePostgres() as pg:            # initdb + start; stop + delete on exit
        engine = create_engine(pg.url)

The directory is removed on exit even after failures (the context manager, the fixture's
``finally`` and, as a last resort, a ``weakref.finalize`` hook that also runs at interpreter exit
for instances never closed; a SIGKILLed test run leaves them behind, of course).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

import pytest
from helpers import create_database

SHARED_PORT = 5432  # the shared server's port: never ours
START_DEADLINE = 30.0  # seconds start() may take before it fails
STOP_DEADLINE = 30.0  # seconds stop() may take before it fails
OS_USER = "postgres"  # the OS user that runs the server when we are root

SETTINGS = """
# --- added by tests/pg_instance.py (PrivatePostgres): a throw-away test cluster ---
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
# Speed over durability (safe against server crashes, not machine crashes): tests only.
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 50
shared_buffers = 32MB
log_line_prefix = '%m [%p] '
"""


def find_bin_dir() -> Path | None:
    """The ``bin`` directory of the highest PostgreSQL version under /usr/lib/postgresql that has
    both ``initdb`` and ``pg_ctl``, or None."""
    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)

    candidates = [d for d in glob.glob("/usr/lib/postgresql/*/bin")
                  if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK)]
    return Path(max(candidates, key=version)) if candidates else None


def unavailable_reason() -> str | None:
    """Why a PrivatePostgres cannot run on this machine, or None if it can."""
    if find_bin_dir() is None:
        return "no PostgreSQL binaries (initdb and pg_ctl) under /usr/lib/postgresql/*/bin"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "runuser is missing: as root, PrivatePostgres runs PostgreSQL as the postgres user with it"
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return f"no {OS_USER!r} OS user to run PostgreSQL as (PostgreSQL refuses to run as root)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's choice; never 5432)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port != SHARED_PORT:
            return port


def _traversable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether a user (uid, primary gid) may enter ``path`` and every directory above it."""
    for directory in [path, *path.parents]:
        mode = directory.stat()
        if mode.st_uid == uid:
            ok = mode.st_mode & stat.S_IXUSR
        elif mode.st_gid == gid:
            ok = mode.st_mode & stat.S_IXGRP
        else:
            ok = mode.st_mode & stat.S_IXOTH
        if not ok:
            return False
    return True


def _pg_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    return env


def _discard(stop_command: list[str], directory: Path) -> None:
    """Stop the server at once if it runs, and delete its directory (``close()``; also run by
    ``weakref.finalize`` for an instance that is garbage-collected or still open at exit)."""
    try:
        if (directory / "data" / "postmaster.pid").exists():
            subprocess.run(stop_command, cwd=directory, env=_pg_env(), stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=40, check=False)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class PrivatePostgres:
    """A private PostgreSQL server in a temporary directory (see the module docstring).

    ``with PrivatePostgres() as pg`` runs ``initdb`` and ``start()``; leaving the block stops the
    server (immediately) and deletes the directory.  Without ``with``: ``start()`` (``initdb`` on
    first use), ``stop()``, ``restart()``, and ``close()`` at the end.

    ``base_dir``: where to make the temporary directory (default: the system's temporary
    directory, or /tmp if the postgres user cannot enter that one).
    """

    def __init__(self, base_dir: str | Path | None = None):
        self.bin_dir = find_bin_dir()
        if self.bin_dir is None:
            raise RuntimeError(unavailable_reason())
        self.as_other_user = os.geteuid() == 0
        if self.as_other_user:
            entry = pwd.getpwnam(OS_USER)
            self.uid, self.gid = entry.pw_uid, entry.pw_gid
        else:
            self.uid, self.gid = os.geteuid(), os.getegid()
        self.dir = self._make_dir(base_dir)
        self.data_dir = self.dir / "data"
        self.socket_dir = self.dir / "run"
        self.log_path = self.dir / "server.log"
        self.port = free_port()
        self._initialised = False
        self._base_conf: str | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _discard, self._command(
            "pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w", "-t", "30"), self.dir)

    # --- set-up -----------------------------------------------------------------------------

    def _make_dir(self, base_dir: str | Path | None) -> Path:
        bases = [Path(base_dir)] if base_dir is not None else [Path(tempfile.gettempdir()), Path("/tmp")]
        for base in bases:
            if _traversable_by(base.resolve(), self.uid, self.gid):
                break
        else:
            raise RuntimeError(f"the {OS_USER} user cannot enter {bases[0]}: give PrivatePostgres another base_dir")
        path = Path(tempfile.mkdtemp(prefix="wis-pg-", dir=base))
        for sub in ("data", "run"):
            (path / sub).mkdir(mode=0o700)
        for item in (path, path / "data", path / "run"):
            os.chown(item, self.uid, self.gid)
        path.chmod(0o700)
        return path

    def _command(self, program: str, *args: str) -> list[str]:
        command = [str(self.bin_dir / program), *args]
        return ["runuser", "-u", OS_USER, "--", *command] if self.as_other_user else command

    def _run(self, program: str, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        # cwd: a directory the postgres user can enter (the caller's may be private to root).
        # stdin from /dev/null; pg_ctl sends the server's own output to the log file (-l), so the
        # captured pipes close when pg_ctl exits.
        done = subprocess.run(self._command(program, *args), cwd=self.dir, env=_pg_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                               f"{self._log_tail()}")
        return done

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- {self.log_path} (last lines) ---\n" + "\n".join(text)

    def initdb(self) -> None:
        """Make the cluster (once)."""
        if self._initialised:
            return
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync", "--no-instructions", timeout=120)
        self._base_conf = (self.data_dir / "postgresql.conf").read_text()
        self._initialised = True

    def _write_settings(self) -> None:
        conf = self.data_dir / "postgresql.conf"
        conf.write_text(self._base_conf + SETTINGS.format(port=self.port, socket_dir=self.socket_dir))
        os.chown(conf, self.uid, self.gid)

    # --- control ----------------------------------------------------------------------------

    def start(self, deadline: float = START_DEADLINE) -> PrivatePostgres:
        """Start the server (making the cluster first if need be) and return once it accepts
        connections on 127.0.0.1:``port``; RuntimeError after ``deadline`` seconds.  The port stays
        the same across stops and starts (a new one is picked only if the first start finds the
        chosen port taken)."""
        if self._closed:
            raise RuntimeError("this PrivatePostgres is closed")
        self.initdb()
        if self.running:
            return self
        first_start = not self.log_path.exists()
        for attempt in range(3):
            self._write_settings()
            done = self._run("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_path),
                             "-w", "-t", str(int(deadline)), timeout=deadline + 10, check=False)
            if done.returncode == 0:
                break
            taken = "could not bind" in self._log_tail() or "already in use" in self._log_tail()
            if first_start and taken and attempt < 2:  # someone took the port in between: another one
                self.port = free_port()
                continue
            raise RuntimeError(f"pg_ctl start failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                               f"{self._log_tail()}")
        self._wait_ready(time.monotonic() + deadline)
        return self

    def _wait_ready(self, end: float) -> None:
        import psycopg

        while True:  # pg_ctl -w already waited; this checks the TCP port the tests use
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                                     connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > end:
                    raise RuntimeError(f"PostgreSQL on port {self.port} did not accept connections: {exc}"
                                       f"{self._log_tail()}") from exc
                time.sleep(0.05)

    def stop(self, mode: str = "fast", deadline: float = STOP_DEADLINE) -> None:
        """Stop the server with ``pg_ctl stop -m <mode>`` and wait until it is gone.

        ``"fast"``: roll back open transactions and disconnect clients, then shut down cleanly.
        ``"immediate"``: quit at once, without a shutdown checkpoint, as a crash would (the next
        start runs crash recovery).  ``"smart"``: wait for clients to disconnect first.
        A stopped server is left as it is."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown stop mode {mode!r}: smart, fast or immediate")
        if not self._initialised or not self.running:
            return
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(int(deadline)),
                  timeout=deadline + 10)

    def restart(self, mode: str = "fast") -> PrivatePostgres:
        """``stop(mode)`` then ``start()``: same port, same data."""
        self.stop(mode)
        return self.start()

    @property
    def running(self) -> bool:
        """Whether the server runs (``pg_ctl status``: exit code 0 running, 3 not)."""
        if not self._initialised or self._closed:
            return False
        return self._run("pg_ctl", "status", "-D", str(self.data_dir), timeout=30, check=False).returncode == 0

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs (first line of postmaster.pid)."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    # --- URLs -------------------------------------------------------------------------------

    def url_for(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL of one database of this server."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        """``postgresql+psycopg://postgres@127.0.0.1:PORT/postgres`` (the maintenance database)."""
        return self.url_for("postgres")

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` on this server (it must run); -> its SQLAlchemy URL."""
        return create_database(self.url, name)

    # --- clean-up ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the server at once (if it runs) and delete the directory.  Idempotent."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> PrivatePostgres:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PrivatePostgres 127.0.0.1:{self.port} in {self.dir}>"


@pytest.fixture
def private_postgres():
    """A started PrivatePostgres of this test alone, stopped and deleted afterwards (whatever the
    test's outcome).  Fails under CI (``CI`` set) and skips elsewhere when the machine cannot run
    one (no PostgreSQL binaries, or as root no ``runuser`` / ``postgres`` user)."""
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"PrivatePostgres is required in CI: {reason}")
        pytest.skip(f"PrivatePostgres unavailable: {reason}")
    with PrivatePostgres() as instance:
        yield instance
