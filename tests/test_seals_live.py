"""Sealing during live ingest (store/ingest/service.py, `workitem-store ingest --seal-key`):
seals every --seal-every seconds while notifications arrive from the CometD test double and once
more at shutdown, so that the last seal covers the log's head and `verify --witness
--public-key` passes; a seal that fails never stops ingest; the config file's sealing keys and
what wins over them; nothing sealed without a key.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from cometd_server import DEADLINE, Control, eventually, notification
from sqlalchemy import func, select
from test_gws_ingest import (
    FAST,
    Ingest,
    _config,
    assert_no_secret,
    metric,
    run,
    subscribed,
    users,
    wait_health,
    wait_rows,
)

from store import seal_check, seals
from store.db import open_store
from store.errors import StoreError
from store.ingest.config import SealingConfig, SessionConfig, load_config, load_sealing
from store.ingest.service import Ingestor
from store.schema import event_log


def clean_env(**extra: str) -> dict:
    """The environment of a child ingest, without any sealing configured by whoever runs the tests."""
    env = {k: v for k, v in os.environ.items() if k not in (seals.KEY_ENV, seals.WITNESS_ENV)}
    return {**env, **extra}


@pytest.fixture
def key(tmp_path) -> tuple[Path, Path]:
    return seals.keygen(tmp_path / "seal.key")


def table_seals(engine) -> list[seals.Seal]:
    with engine.connect() as conn:
        return seals.table_seals(conn)


def witness_seals(path: Path) -> list[seals.Seal]:
    if not path.exists():
        return []
    found, problems = seals.read_witness(path)
    assert problems == []
    return found


def head_seq(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.max(event_log.c.seq))).scalar() or 0


def verify_cli(db_url: str, witness: Path, public_key: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "store", "verify", "--witness", str(witness),
                           "--public-key", str(public_key), "--db", db_url],
                          check=False, capture_output=True, text=True, timeout=120, env=clean_env())


async def publish(control: Control, names: list[str], refs: range) -> None:
    await asyncio.gather(*(control.publish([notification(r, u) for r in refs], user=u) for u in names))


# -- the command, both engines ------------------------------------------------------------------------

def test_ingest_seals_every_second_and_at_sigterm_and_verify_passes(cometd, db_url, tmp_path, key):
    """`ingest --seal-key K --witness W --seal-every 1`: seals appear in the table and the witness
    file while it runs; after SIGTERM the last seal is at the log's head (the "ended" markers
    included) and `verify --witness W --public-key K.pub` exits 0."""
    private, public = key
    witness = tmp_path / "witness" / "seals.jsonl"
    witness.parent.mkdir()
    names = users(2)
    config, env = _config(tmp_path / "agents.toml", cometd.base, names)
    ingest = Ingest(["--config", str(config), "--db", db_url, "--metrics-port", "0", "--seal-key", str(private),
                     "--witness", str(witness), "--seal-every", "1"], clean_env(**env), tmp_path / "ingest.log")

    async def main():
        engine = open_store(db_url)
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            try:
                await ingest.start()
                await wait_health(ingest.base, 200, "every session connected")
                await subscribed(control, names)
                await publish(control, names, range(5))
                await wait_rows(engine, 10)

                async def two_seals_since(seq):  # sealed while running, the new rows included
                    made = await asyncio.to_thread(table_seals, engine)
                    return made if len([s for s in made if s.seq >= seq]) >= 2 else None
                seq = head_seq(engine)
                while_running = await eventually(lambda: two_seals_since(seq), "two seals while running")
                witnessed_while_running = witness_seals(witness)
                async with http.get(f"{ingest.base}/metrics") as response:
                    metrics = await response.text()
                async with http.get(f"{ingest.base}/healthz") as response:
                    healthy = await response.json()
                await publish(control, names, range(5, 10))
                await wait_rows(engine, 20)
                cmdline = Path(f"/proc/{ingest.process.pid}/cmdline").read_bytes().decode()
                out = await ingest.terminate()
            finally:
                ingest.cleanup()
        made, head = table_seals(engine), head_seq(engine)
        engine.dispose()
        return while_running, witnessed_while_running, metrics, healthy, out, cmdline, made, head

    while_running, witnessed_while_running, metrics, healthy, out, cmdline, made, head = run(main(), 120)
    assert ingest.process.returncode == 0, out
    assert len(while_running) >= 2 and all(s.witnessed for s in while_running)
    assert witnessed_while_running[:len(while_running)] == while_running  # the file as it was written
    assert metric(metrics, "workitem_store_seals_total") >= 2
    assert metric(metrics, "workitem_store_seal_failing") == 0
    assert metric(metrics, "workitem_store_last_seal_seq") >= 10
    assert healthy["status"] == "ok" and healthy["seals"]["error"] is None and healthy["seals"]["made"] >= 2
    assert healthy["seals"]["every_seconds"] == 1 and healthy["seals"]["witness"] == str(witness)
    # The last seal, made at shutdown, covers everything stored; the witness holds every seal.
    assert made[-1].seq == head and head >= 20 + 2 * 3  # notifications, started, snapshot, ended
    assert [s.n for s in made] == list(range(1, len(made) + 1)) and len(made) > len(while_running)
    assert witness_seals(witness) == made
    assert f"sealed: seal {made[-1].n}, seq {head}" in out and f"{len(made)} seals made, 0 failed" in out
    done = verify_cli(db_url, witness, public)
    assert done.returncode == 0, done.stdout + done.stderr
    # The key's path is on the command line, never the key itself.
    secret = "".join(private.read_text().splitlines()[1:-1])
    assert secret not in cmdline and secret not in ingest.log_path.read_text() and secret not in out
    assert_no_secret(cmdline, out, ingest.log_path.read_text(encoding="utf-8"))


# -- the library: a seal that fails ---------------------------------------------------------------

def test_a_failing_witness_is_retried_shown_in_health_and_never_stops_ingest(cometd, tmp_path, key):
    """The witness file cannot be appended to (a directory stands in its place) for a while:
    seals fail and are retried, /healthz and /metrics say so, notifications go on being stored;
    once it can be written again sealing resumes, and the seals table and the file agree."""
    private, public = key
    witness = tmp_path / "seals.jsonl"
    [user] = users(1)
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    sealing = seals.Sealing(seals.load_private_key(private), witness, every=0.2)

    async def main():
        engine = open_store(db_url)
        ingestor = Ingestor(engine, [SessionConfig(cometd.base, user, "pw")], metrics_port=0, sealing=sealing,
                            **FAST)
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)
            task = asyncio.create_task(ingestor.run())
            try:
                await subscribed(control, [user])
                base = f"http://127.0.0.1:{ingestor.metrics_port}"
                await wait_health(base, 200, "the session connected")
                await eventually(lambda: ingestor.seals_made >= 1, "a first seal")
                witness.rename(tmp_path / "aside.jsonl")
                witness.mkdir()  # appending to it now fails (also as root)
                failing = await wait_health(base, 503, "the seals to be unhealthy")
                await control.publish([notification(r, user) for r in range(5)], user=user)
                await wait_rows(engine, 5)  # ingest goes on
                async with http.get(f"{base}/metrics") as response:
                    metrics = await response.text()
                failures = ingestor.seal_failures
                await eventually(lambda: ingestor.seal_failures > failures, "another attempt")
                witness.rmdir()
                (tmp_path / "aside.jsonl").rename(witness)
                healthy = await wait_health(base, 200, "sealing to work again")
                await eventually(lambda: ingestor.last_seal is not None and ingestor.last_seal.seq >= 5,
                                 "a seal of the new rows")
            finally:
                ingestor.stop()
                errors = await task
        made, head = table_seals(engine), head_seq(engine)
        engine.dispose()
        return errors, failing, metrics, healthy, made, head

    errors, failing, metrics, healthy, made, head = run(main(), 60)
    assert errors == []
    [unhealthy] = failing["unhealthy"]
    assert unhealthy["component"] == "seals" and "witness file" in unhealthy["reason"]
    assert failing["seals"]["error"] and failing["seals"]["failing_since"] and failing["seals"]["failures"] >= 1
    assert metric(metrics, "workitem_store_seal_failing") == 1
    assert metric(metrics, "workitem_store_seal_failures_total") >= 1
    assert metric(metrics, "workitem_store_healthy") == 0
    assert healthy["seals"]["error"] is None and healthy["unhealthy"] == []
    # A failed seal left nothing behind: numbered without gaps, table and file alike, to the head.
    assert [s.n for s in made] == list(range(1, len(made) + 1)) and made[-1].seq == head
    assert witness_seals(witness) == made
    engine = open_store(db_url)
    with engine.connect() as conn:
        report = seal_check.check(conn, witness, seals.load_public_key(public))
    engine.dispose()
    assert report.problems == [] and report.last_valid == made[-1]


# -- startup: what cannot work is said before any session starts ----------------------------------

def test_a_witness_or_key_that_cannot_be_used_stops_ingest_before_any_session(cometd, tmp_path, key):
    private, _ = key
    [user] = users(1)
    db = str(tmp_path / "s.db")
    args = ["--gws-url", cometd.base, "--user", user, "--password-env", "SEAL_TEST_PW", "--db", db]
    loose = tmp_path / "loose.key"
    loose.write_bytes(private.read_bytes())
    loose.chmod(0o644)
    cases = [
        (["--seal-key", str(private), "--witness", str(tmp_path / "no-such-dir" / "w.jsonl")],
         "the witness file's directory"),
        (["--seal-key", str(private), "--witness", str(tmp_path)], "is a directory"),
        (["--seal-key", str(tmp_path / "missing.key")], "cannot read the seal key"),
        (["--seal-key", str(loose)], "readable by other users"),
        (["--witness", str(tmp_path / "w.jsonl")], "a witness file is configured but no seal key"),
    ]
    # Child processes with a deadline: an ingest that did start would run until killed.
    children = [subprocess.Popen([sys.executable, "-m", "store", "ingest", *args, *extra],
                                 env=clean_env(SEAL_TEST_PW="pw"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for extra, _ in cases]
    try:
        for child, (extra, error) in zip(children, cases, strict=True):
            out, _ = child.communicate(timeout=30)
            assert child.returncode in (1, 2) and error in out, (extra, out)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(5)

    async def sessions():
        async with aiohttp.ClientSession() as http:
            return [e for e in await Control(cometd, http).call("log") if e.get("user") == user]
    assert run(sessions()) == []  # no handshake was ever sent


# -- the config file, and what wins over it ----------------------------------------------------------

def test_config_file_sealing_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("A_PW", "secret-a")
    path = tmp_path / "c.toml"
    session = '[[sessions]]\nuser = "a"\npassword_env = "A_PW"\n'

    def write(text: str) -> Path:
        path.write_text('gws_url = "http://gws"\n' + text, encoding="utf-8")
        return path

    write('seal_key = "/k/seal.key"\nwitness = "/w/seals.jsonl"\nseal_every = 5\n' + session)
    assert load_sealing(path) == SealingConfig("/k/seal.key", "/w/seals.jsonl", 5.0)
    assert [s.user for s in load_config(path)] == ["a"]  # the sessions read as before
    write('seal_every = 0.5\n' + session)
    assert load_sealing(path) == SealingConfig(None, None, 0.5)
    assert load_sealing(write(session)) == SealingConfig()
    for text, error in [
        ('seal_every = "10"\n' + session, "seal_every must be a number of seconds, at least 0.1"),
        ("seal_every = 0\n" + session, "seal_every must be a number"),
        ("seal_every = true\n" + session, "seal_every must be a number"),
        ("seal_every = nan\n" + session, "seal_every must be a number"),
        ("seal_key = 3\n" + session, "seal_key must be a non-empty string"),
        ('witness = ""\n' + session, "witness must be a non-empty string"),
        (session + 'seal_key = "/k/seal.key"\n', "seal_key apply to the whole store: set them at the top"),
        ('seal_keys = "/k"\n' + session, "unknown top-level keys seal_keys"),
    ]:
        write(text)
        with pytest.raises(StoreError, match=error):
            load_config(path)
        if "whole store" not in error:  # (only the sessions say where a key may not be)
            with pytest.raises(StoreError, match=error):
                load_sealing(path)


@pytest.mark.parametrize("how", ["file", "env", "option", "none"])
def test_what_configures_sealing_option_env_file(how, tmp_path, monkeypatch):
    """Which Sealing `ingest` hands to the Ingestor: an option wins over the environment, which
    wins over the config file; without a key anywhere, None (nothing is sealed)."""
    from click.testing import CliRunner

    from store import cli
    from store.ingest import service

    keys = {name: seals.keygen(tmp_path / f"{name}.key")[0] for name in ("file", "env", "option")}
    path = tmp_path / "c.toml"
    path.write_text(f'gws_url = "http://gws"\nseal_key = "{keys["file"]}"\nwitness = "{tmp_path / "file.jsonl"}"\n'
                    'seal_every = 7\n[[sessions]]\nuser = "a"\npassword = "p"\n', encoding="utf-8")
    if how == "none":
        path.write_text('gws_url = "http://gws"\n[[sessions]]\nuser = "a"\npassword = "p"\n', encoding="utf-8")
    env = {seals.KEY_ENV: None, seals.WITNESS_ENV: None}
    if how == "env":
        env = {seals.KEY_ENV: str(keys["env"]), seals.WITNESS_ENV: str(tmp_path / "env.jsonl")}
    extra = ["--seal-key", str(keys["option"]), "--witness", str(tmp_path / "option.jsonl"),
             "--seal-every", "3"] if how == "option" else []
    given = {}

    class Capture:  # the Ingestor, as far as `ingest` uses it: stops at once
        def __init__(self, engine, configs, **options):
            given.update(options)
            self.sessions, self.last_projected_seq, self.stopped_by_request = [], None, True
            self.seals_made, self.seal_failures, self.last_seal, self.seal_error = 0, 0, None, None
            self.writer = type("Writer", (), {"spool_bytes": lambda _self: 0})()

        def stop(self):
            pass

        async def run(self):
            return []

    monkeypatch.setattr(service, "Ingestor", Capture)
    result = CliRunner().invoke(cli.main, ["ingest", "--config", str(path), "--db", str(tmp_path / "s.db"), *extra],
                                env=env)
    assert result.exit_code == 0, result.output
    sealing = given["sealing"]
    if how == "none":
        assert sealing is None and "seals made" not in result.output
        return
    expected_key = seals.load_private_key(keys[how]).public_key()
    assert seals.key_id(sealing.key.public_key()) == seals.key_id(expected_key)
    assert sealing.witness == tmp_path / f"{how}.jsonl"
    assert sealing.every == {"file": 7, "env": 7, "option": 3}[how]  # (no variable for the interval)
    assert "0 seals made, 0 failed" in result.output


def test_config_file_seals_a_live_ingest_and_no_key_seals_nothing(cometd, tmp_path, key):
    """The config file's seal_key, witness and seal_every at work in a live `ingest`; then the
    same store followed without any key: no seal is added and /metrics has no seal samples."""
    private, public = key
    witness = tmp_path / "seals.jsonl"
    names = users(1)
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    config, env = _config(tmp_path / "agents.toml", cometd.base, names)
    sealed_config = tmp_path / "sealed.toml"
    sealed_config.write_text(f'seal_key = "{private}"\nwitness = "{witness}"\nseal_every = 0.5\n'
                             + config.read_text(), encoding="utf-8")
    sealed = Ingest(["--config", str(sealed_config), "--db", db_url, "--metrics-port", "0"], clean_env(**env),
                    tmp_path / "sealed.log")
    plain = Ingest(["--config", str(config), "--db", db_url, "--metrics-port", "0"], clean_env(**env),
                   tmp_path / "plain.log")

    async def follow(ingest: Ingest, control: Control, http, refs: range, until) -> tuple[str, str]:
        try:
            await ingest.start()
            await wait_health(ingest.base, 200, "the session connected")
            await subscribed(control, names)
            await publish(control, names, refs)
            await eventually(until, "the ingestor to get there", DEADLINE)
            async with http.get(f"{ingest.base}/metrics") as response:
                metrics = await response.text()
            return metrics, await ingest.terminate()
        finally:
            ingest.cleanup()

    async def main():
        engine = open_store(db_url)
        async with aiohttp.ClientSession() as http:
            control = Control(cometd, http)

            async def sealed_rows():
                made = await asyncio.to_thread(table_seals, engine)
                return len(made) >= 2 and made[-1].seq >= 5
            first = await follow(sealed, control, http, range(5), sealed_rows)
            after_first = table_seals(engine)
            second = await follow(plain, control, http, range(5, 10),
                                  lambda: asyncio.to_thread(lambda: len(_notifications(engine)) >= 10))
        made, head = table_seals(engine), head_seq(engine)
        engine.dispose()
        return first, second, after_first, made, head

    (metrics1, out1), (metrics2, out2), after_first, made, head = run(main(), 120)
    assert sealed.process.returncode == 0 and plain.process.returncode == 0, out1 + out2
    assert len(after_first) >= 3 and witness_seals(witness) == after_first  # from the file's keys
    assert metric(metrics1, "workitem_store_seals_total") >= 2
    assert made == after_first and head > after_first[-1].seq  # the keyless run sealed nothing
    assert "seals made" not in out2 and not re.search("^workitem_store_seals_total", metrics2, re.MULTILINE)
    assert "# TYPE workitem_store_seals_total counter" in metrics2
    # What was sealed still verifies; the keyless run's rows are simply not sealed yet.
    done = verify_cli(db_url, witness, public)
    assert done.returncode == 0, done.stdout + done.stderr


def _notifications(engine) -> list:
    with engine.connect() as conn:
        return conn.execute(select(event_log.c.seq).where(event_log.c.kind == "notification")).all()
