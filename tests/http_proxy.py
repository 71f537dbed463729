"""A real HTTP proxy for tests: pproxy (https://pypi.org/project/pproxy/) in a child process.

What it runs: ``python -u -c <launcher> -l http://127.0.0.1:0 -v``, where the launcher only sets
an event loop and calls ``pproxy.server.main()`` (the same entry point as the ``pproxy``
command; pproxy calls ``asyncio.get_event_loop()``, which newer Pythons no longer allow without
a loop).  The ``http`` listener of pproxy is a real forward proxy:

* ``CONNECT host:port`` opens a TCP tunnel (what clients do for https: TLS stays end to end,
  the proxy sees no plaintext);
* requests with an absolute URL (``GET http://host:port/path``) are forwarded to that host.

Binding port 0 lets the OS choose a free port; pproxy prints ``Serving on ... 127.0.0.1:PORT``
once it listens, which is the readiness signal.  With ``-v`` it prints one line per proxied
connection, before it connects to the target::

    http 127.0.0.1:51234 -> 127.0.0.1:8443

A thread reads those lines; ``targets()`` lists the ``host:port`` of each one, in order.  So a
test can assert that traffic went through the proxy, and where to.  Mind that pproxy logs one
line per *client connection* (a CONNECT tunnel, or a kept-alive connection forwarding plain
http requests), not per request: a client that reuses a pooled connection adds no line (open a
new session to be sure of a line).  The line looks the same for CONNECT and for forwarding; an
https request that succeeds through it can only have been tunnelled.  pproxy sends every request
on a kept-alive forwarding connection to that connection's first target (aiohttp pools
connections per target, so it never mixes them).  Use
``wait_for_target()`` rather than ``targets()`` right after a request: the line is printed before
the proxy connects to the target, but the reading thread may not have picked it up yet.

Usage::

    from http_proxy import HttpProxy  # (the http_proxy fixture: conftest.py)

    async with session.get(url, proxy=http_proxy.url) as response: ...
    http_proxy.wait_for_target("127.0.0.1:8443")

    with HttpProxy() as proxy:
        ...
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import pytest

START_DEADLINE = 15.0  # seconds the proxy may take to listen
LAUNCHER = ("import asyncio; asyncio.set_event_loop(asyncio.new_event_loop()); "
            "from pproxy.server import main; main()")
SERVING = re.compile(r"^Serving on .*?(\S+):(\d+) by ")
CONNECTION = re.compile(r"^(\S+) (\S+) -> (\S+)$")  # "<protocol> <client ip:port> -> <host:port>"


class HttpProxy:
    """pproxy's http forward proxy in a child process on 127.0.0.1 (see the module docstring).

    ``url``: ``http://127.0.0.1:PORT``, for aiohttp's ``proxy=`` or HTTP(S)_PROXY.
    ``targets()``: the ``host:port`` each proxied connection asked for, in order.
    ``lines()``: everything pproxy printed (for failure messages).
    """

    def __init__(self):
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._targets: list[str] = []
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None
        self._ended = False  # the child's output has ended (it exited)

    def start(self) -> HttpProxy:
        try:
            import pproxy  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("pproxy is not installed: pip install pproxy") from exc
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            env.pop(name, None)  # direct connections to the targets, whatever the test's environment
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-c", LAUNCHER, "-l", "http://127.0.0.1:0", "-v"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self._reader = threading.Thread(target=self._read, name="pproxy-output", daemon=True)
        self._reader.start()
        with self._changed:  # the reader sets the port on "Serving on ...", or the output ends
            listening = self._changed.wait_for(lambda: self.port or self._ended, START_DEADLINE)
        if not self.port:
            self.stop()
            why = "exited" if listening else f"did not listen within {START_DEADLINE} s"
            raise RuntimeError(f"pproxy {why}:\n" + "".join(self._lines))
        return self

    def _read(self) -> None:
        try:
            for raw in self.process.stdout:
                line = raw.decode(errors="replace")
                with self._changed:
                    self._lines.append(line)
                    if match := CONNECTION.match(line.strip()):
                        self._targets.append(match.group(3))
                    elif not self.port and (match := SERVING.match(line)):
                        self.port = int(match.group(2))
                    self._changed.notify_all()
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def targets(self) -> list[str]:
        """The ``host:port`` of each connection proxied so far (CONNECT or forwarded http)."""
        with self._changed:
            return list(self._targets)

    def lines(self) -> list[str]:
        with self._changed:
            return list(self._lines)

    def clear(self) -> None:
        """Forget the targets seen so far."""
        with self._changed:
            self._targets.clear()

    def wait_for_target(self, target: str, timeout: float = 5.0) -> None:
        """Wait until the proxy has been asked for ``target`` (``host:port``); AssertionError
        after ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: target in self._targets, timeout):
                raise AssertionError(f"the proxy was not asked for {target}; it saw {self._targets}\n"
                                     + "".join(self._lines))

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._reader is not None:
            self._reader.join(5)  # EOF once the process is gone
        self.process.stdout.close()

    def __enter__(self) -> HttpProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<HttpProxy {self.url}>"


@pytest.fixture
def http_proxy():
    """A started HttpProxy of this test alone, stopped afterwards."""
    with HttpProxy() as proxy:
        yield proxy
