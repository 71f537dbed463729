"""The CometD test double (tests/cometd/server.js: npm cometd-nodejs-server made to behave as the
Java CometD 3.1 server behind GWS, plus GWS resources) in a child process, and its control API.

Shared by tests/test_bayeux.py and tests/test_gws_ingest.py; the session-scoped fixtures
``node_modules`` and ``cometd`` are registered in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import inspect
import json
import os
import select
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from store.gws_protocol import CHANNEL
from store.ingest.bayeux import BayeuxClient

COMETD_DIR = Path(__file__).parent / "cometd"

DEADLINE = 15.0  # seconds any single wait may take before the test fails


@pytest.fixture(scope="session")
def node_modules():
    """tests/cometd/node_modules, installed with `npm ci` once if missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        message = "node and npm are needed for the CometD server of tests/test_bayeux.py"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # Test workers (pytest-xdist) each run this fixture: the first installs, the others wait on the lock.
    with open(COMETD_DIR / ".npm-ci.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (COMETD_DIR / "node_modules" / "cometd-nodejs-server").is_dir():
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=COMETD_DIR, check=False,
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                pytest.fail(f"npm ci in {COMETD_DIR} failed:\n{done.stdout}\n{done.stderr}")
    return node


class NodeServer:
    """tests/cometd/server.js in a child process, on 127.0.0.1.

    ``timeout`` / ``max_interval``: the server's Bayeux timeout and maxInterval (milliseconds;
    the server's defaults are 2000 and 10000); ``tls``: ``(cert_path, key_path)`` to serve https
    (PEM files; the certificate must be issued for 127.0.0.1).  ``start()`` after ``kill()`` or
    ``stop()`` starts it again on the same port, as a restarted server.
    """

    def __init__(self, node: str, log_path: Path, *, timeout: int | None = None,
                 max_interval: int | None = None, tls: tuple[str | Path, str | Path] | None = None):
        self.node, self.log_path, self.port, self.process = node, log_path, 0, None
        self.timeout, self.max_interval, self.tls = timeout, max_interval, tls

    def command(self) -> list[str]:
        command = [self.node, "server.js", str(self.port)]
        if self.timeout is not None:
            command += ["--timeout", str(int(self.timeout))]
        if self.max_interval is not None:
            command += ["--max-interval", str(int(self.max_interval))]
        if self.tls is not None:
            cert, key = self.tls
            command += ["--tls", str(Path(cert).resolve()), str(Path(key).resolve())]
        return command

    def start(self) -> NodeServer:
        with open(self.log_path, "ab") as stderr:
            self.process = subprocess.Popen(self.command(), cwd=COMETD_DIR, stdout=subprocess.PIPE, stderr=stderr)
        ready, _, _ = select.select([self.process.stdout], [], [], DEADLINE)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"the CometD server did not start: see {self.log_path}")
        self.port = json.loads(line)["port"]
        # The readiness probe only: it checks no certificate (the tests' clients do).
        context = ssl._create_unverified_context() if self.tls is not None else None  # noqa: S323
        deadline = time.monotonic() + DEADLINE
        while True:  # it prints once listening; still, wait until it answers
            try:
                with urllib.request.urlopen(f"{self.base}/control/ping", timeout=1, context=context):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @property
    def base(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/api/v2/notifications"

    def kill(self) -> None:
        """Die at once, as a crash would: every session and queued message is gone."""
        self.process.kill()
        self.process.wait(5)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def cometd(node_modules, tmp_path_factory):
    server = NodeServer(node_modules, tmp_path_factory.mktemp("cometd") / "server.log").start()
    yield server
    server.stop()


class Control:
    """The server's control API (see the header of tests/cometd/server.js).  ``http`` is any
    aiohttp session; for an https server, give it an SSL context that trusts the server's CA."""

    def __init__(self, server: NodeServer, http: aiohttp.ClientSession):
        self.base, self.http = server.base, http

    async def call(self, path: str, body: dict | None = None):
        method = self.http.post if body is not None else self.http.get
        async with method(f"{self.base}/control/{path}", json=body) as response:
            assert response.status == 200, (path, response.status, await response.text())
            return await response.json()

    async def publish(self, data: list[dict], to: str | None = None, user: str | None = None,
                      channel: str = CHANNEL) -> dict:
        """To one session (``to``), to the subscribed sessions of a login (``user``), or to every
        subscriber; -> {"published": n, "sessions": [clientId...]}."""
        body = {"channel": channel, "data": data, "to": to}
        if user is not None:
            body["user"] = user
        return await self.call("publish", body)

    async def publish_raw(self, texts: list[str | bytes], to: str | None = None, user: str | None = None,
                          channel: str = CHANNEL, as_message: bool = False) -> dict:
        """Publish poison exactly as a client would receive it: each text (or bytes: any bytes,
        UTF-8 or not) goes into the response body as given, never parsed or re-serialised, as the
        ``data`` of a delivery on ``channel`` or, ``as_message``, as a whole element of the
        response array.  Targets as ``publish``; the control log shows a token in its place."""
        binary = any(isinstance(t, bytes) for t in texts)
        raw = [base64.b64encode(t if isinstance(t, bytes) else t.encode("utf-8", "surrogatepass")).decode("ascii")
               for t in texts] if binary else list(texts)
        body = {"channel": channel, "raw": raw, "to": to, "as": "message" if as_message else "data"}
        if binary:
            body["encoding"] = "base64"
        if user is not None:
            body["user"] = user
        return await self.call("publish", body)

    async def configure(self, user: str, ack: str | None = None, java402: bool | None = None) -> dict:
        """For sessions that handshake with ``user`` from now on: the ack extension "on" (the
        default), "object" (Java's {enabled, batch} form) or "off"; Java's 402 wording."""
        body: dict = {"user": user}
        if ack is not None:
            body["ack"] = ack
        if java402 is not None:
            body["java402"] = java402
        return await self.call("configure", body)

    async def users(self) -> dict:
        """{login: {"sessions", "published", "lost", "acked": {clientId: [data...]}}}"""
        return await self.call("users")

    async def workitems(self, user: str | None = None):
        """Every login's current workitem resources, or one login's list."""
        lists = await self.call("workitems")
        return lists if user is None else lists.get(user, [])

    async def set_workitems(self, user: str, items: list[dict]) -> list[dict]:
        return (await self.call("workitems", {"user": user, "workitems": items}))[user]

    async def fail_workitems(self, user: str, status: int = 500, count: int = 1) -> dict:
        return await self.call("fail-workitems", {"user": user, "status": status, "count": count})

    async def auth(self, users: dict[str, str | None]) -> dict:
        """Register logins whose password is checked (None: forget one)."""
        return await self.call("auth", {"users": users})

    async def traffic(self, client_id: str) -> list[dict]:
        """The log entries of one client: requests that carry its clientId or replies naming it."""
        def concerns(entry):
            return any(m.get("clientId") == client_id for m in entry["messages"] + (entry["reply"] or []))
        return [entry for entry in await self.call("log") if concerns(entry)]

    async def wait_subscribed(self, client: BayeuxClient, not_id: str | None = None) -> str:
        """Wait until the server holds a subscription for the client's (new) session."""
        async def subscribed():
            cid = client.client_id
            if cid is None or cid == not_id:
                return None
            sessions = {s["id"]: s["subscriptions"] for s in await self.call("sessions")}
            return cid if CHANNEL in sessions.get(cid, []) else None
        return await eventually(subscribed, "the client to be subscribed")


async def _value(result):
    return await result if inspect.isawaitable(result) else result


async def eventually(probe, what: str, deadline: float = DEADLINE):
    """Poll ``probe()`` (a function or a coroutine function) until it returns something truthy;
    fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not (result := await _value(probe())):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return result


def notification(ref: int, tag: str = "w") -> dict:
    """A GWS WorkitemStateChangeMessage ``data``; ``referenceId`` numbers it within a test."""
    return {"messageType": "WorkitemStateChangeMessage", "notificationType": "StatusChange",
            "referenceId": ref,
            "workitem": {"id": f"{tag}-{ref}", "workitemType": "Email", "state": "Invited",
                         "capabilities": ["Accept", "Reject"],
                         "userData": {"Subject": f"Rückerstattung ✓ «{ref}»", "Note": "a \"quoted\" ]},["}}}


class Recorder:
    """The on_batch callback: records each attempt, commits unless ``fail(batch)`` says no."""

    def __init__(self, fail=lambda batch: False):
        self.fail, self.attempts, self.committed = fail, [], []
        self.changed = asyncio.Condition()

    async def __call__(self, batch):
        self.attempts.append(batch)
        if self.fail(batch):
            raise RuntimeError("the store could not commit")
        async with self.changed:
            self.committed.extend(batch)
            self.changed.notify_all()

    async def wait_for(self, count: int) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: len(self.committed) >= count), DEADLINE)

    def refs(self, batches=None) -> list[int]:
        items = self.committed if batches is None else [m for b in batches for m in b]
        return [message["data"]["referenceId"] for message, _ in items]

    def messages(self) -> list[dict]:
        return [message for message, _ in self.committed]


# -- poison: what no message may do to a session (issue 8) -----------------------------------------

def _poison_data(ref: int, workitem: str, user_data: str = '{"Subject": "x"}', id_text: str | None = None,
                 capabilities: str = '["Accept"]', reference: str | None = None) -> str:
    """The raw text of a WorkitemStateChangeMessage ``data`` with one part spelled as given."""
    id_text = id_text if id_text is not None else json.dumps(workitem)
    reference = reference if reference is not None else str(ref)
    return ('{"messageType":"WorkitemStateChangeMessage","notificationType":"StatusChange",'
            f'"referenceId":{reference},"workitem":{{"id":{id_text},"workitemType":"Email",'
            f'"state":"Invited","capabilities":{capabilities},"userData":{user_data}}}}}')


HUGE_ARRAY = 2_000_000  # elements of the huge userData array (4 MB of text)
DEEP = 100_000          # nesting levels of the deep userData value

# (name, raw text or bytes, as_message, must be quarantined): each the raw ``data`` of a delivery
# on CHANNEL (as_message: a whole element of the response array), published with
# Control.publish_raw.  Which of them a real server could send: see "Raw text" in
# tests/cometd/server.js.  "must be quarantined": no classification may take it in as a valid
# notification (the others may be either, as long as they are stored).
POISON: list[tuple[str, str | bytes, bool, bool]] = [
    ("lone surrogate in workitem.id", _poison_data(9001, "", id_text='"p-\\ud800"'), False, True),
    ("6,000-character workitem.id", _poison_data(9002, "p-" + "I" * 5998), False, True),
    ("3,000-byte referenceId", _poison_data(9003, "p-ref", reference=json.dumps("R" * 2000 + "é" * 500)), False,
     True),
    ("\\u0000 inside userData", _poison_data(9004, "p-nul", user_data='{"Note": "a\\u0000b"}'), False, True),
    ("NaN and Infinity as numbers", _poison_data(9005, "p-nan", user_data='{"n": NaN, "i": Infinity, '
                                                                          '"m": -Infinity}'), False, True),
    ("huge array in userData", _poison_data(9006, "p-huge", user_data='{"List": [' + ",".join(
        ["0"] * HUGE_ARRAY) + "]}"), False, False),
    ("nesting 100,000 levels deep", _poison_data(9007, "p-deep", user_data="[" * DEEP + "]" * DEEP), False, True),
    ("1e300 as userData", _poison_data(9008, "p-float", user_data="1e300"), False, False),
    ("5,000-character capability", _poison_data(9009, "p-cap", capabilities=json.dumps(["C" * 5000])), False,
     False),
    ("a number, not an object", "42", True, True),
    ("a string, not an object", '"a message?"', True, True),
    ("not UTF-8 (Latin-1 0xFF in a string)", _poison_data(9010, "p-latin1", user_data='{"Note": "caf\xff"}').encode(
        "latin-1"), False, True),
]
