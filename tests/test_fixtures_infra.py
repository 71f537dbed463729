"""Tests of the test infrastructure itself: tests/pg_instance.py and tests/http_proxy.py.

* PrivatePostgres: a real PostgreSQL cluster of its own is started, used through SQLAlchemy,
  stopped (a connection attempt then fails at once), started again with its data intact, and
  deleted; the shared server on 127.0.0.1:5432 answers throughout.
* HttpProxy: real aiohttp servers on 127.0.0.1 (http, and https with a certificate of a
  ``trustme`` test CA) are reached through the pproxy child process, by aiohttp's ``proxy=``
  argument and by HTTP_PROXY / HTTPS_PROXY with ``trust_env=True``; NO_PROXY sends a host direct.

What aiohttp does with the proxy variables (aiohttp 3.14, Python 3.11, Linux), as these tests
show: with ``trust_env=True`` aiohttp asks ``urllib.request.proxy_bypass(host)``, which on Linux
is ``proxy_bypass_environment``: a host is sent direct only if NO_PROXY / no_proxy names it (the
exact host, a DNS suffix of it, or ``*``).  Loopback gets no special treatment: 127.0.0.1 and
``localhost`` ARE proxied when NO_PROXY does not list them, and CIDR ranges such as
``127.0.0.0/8`` in NO_PROXY are not understood.  (A lower-case variable wins over its upper-case
twin; HTTP_PROXY is ignored when REQUEST_METHOD is set, as in a CGI script: so these tests clear
all of them first.)  To show that NO_PROXY excludes one host while another is still proxied, a
name of our own, ``excluded.test``, is made to resolve to 127.0.0.1 by a custom aiohttp resolver:
only a direct connection can reach it (through the proxy it would have to be resolved by the
proxy, which cannot).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time

import aiohttp
import psycopg
import pytest
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver
from http_proxy import HttpProxy
from pg_instance import SHARED_PORT, PrivatePostgres
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy", "wss_proxy")
EXCLUDED = "excluded.test"  # resolved to 127.0.0.1 by StaticResolver only


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


# --- PrivatePostgres -----------------------------------------------------------------------

def shared_server_answers(engine) -> bool:
    with engine.connect() as conn:
        return conn.execute(text("SELECT 1")).scalar() == 1


def test_private_postgres_stop_start_restart(private_postgres, pg_admin):
    pg = private_postgres
    assert pg.port != SHARED_PORT and pg_admin.url.port in (None, SHARED_PORT)
    assert shared_server_answers(pg_admin)
    assert pg.running

    url = pg.create_database("infra")
    assert url == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/infra"
    # NullPool: every connect() is a new connection, so a stopped server shows at once.
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 2})
    try:
        with engine.begin() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
            conn.execute(text("CREATE TABLE kept (v int)"))
            conn.execute(text("INSERT INTO kept VALUES (42)"))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT current_setting('port')")).scalar() == str(pg.port)
        held = engine.connect()  # open across the stop: the server ends it

        pg.stop()
        assert not pg.running
        started = time.monotonic()
        with pytest.raises(OperationalError):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="infra", connect_timeout=2)
        assert time.monotonic() - started < 3  # refused, not timed out
        with pytest.raises(OperationalError):
            held.execute(text("SELECT 1"))
        held.close()
        assert shared_server_answers(pg_admin)

        pg.start()
        assert pg.running
        with engine.connect() as conn:
            assert conn.execute(text("SELECT v FROM kept")).scalar() == 42
        assert shared_server_answers(pg_admin)

        # A crash-like stop: no shutdown checkpoint, crash recovery on the next start.
        pg.restart("immediate")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT v FROM kept")).scalar() == 42
        assert "database system was interrupted" in pg.log_path.read_text()
    finally:
        engine.dispose()
    assert shared_server_answers(pg_admin)


def test_private_postgres_cleans_up_after_failure(private_postgres, pg_admin):
    # (private_postgres: only for its check that this machine can run one)
    with pytest.raises(ZeroDivisionError):
        with PrivatePostgres() as pg:
            directory, port = pg.dir, pg.port
            assert pg.running and (directory / "data" / "PG_VERSION").exists()
            1 / 0  # noqa: B018
    assert not directory.exists()
    assert not pg.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=port, user="postgres", connect_timeout=2)
    pg.close()  # idempotent
    with pytest.raises(ValueError):
        private_postgres.stop("slow")
    assert private_postgres.running and shared_server_answers(pg_admin)


# --- HttpProxy -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls():
    """(server SSL context, client SSL context) of a trustme CA: 127.0.0.1, localhost, excluded.test."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost", EXCLUDED).configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


@pytest.fixture
def clean_proxy_env(monkeypatch):
    """No proxy variable of the machine's environment (any case) leaks into a test."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)
    return monkeypatch


@contextlib.asynccontextmanager
async def serve(ssl_context: ssl.SSLContext | None = None):
    """An aiohttp server on 127.0.0.1 (free port) answering ``<scheme> <Host header> <path>``;
    yields its port."""
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.scheme} {request.host} {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


class StaticResolver(AbstractResolver):
    """Resolves the names it is given itself (to IPv4 addresses); any other through the system."""

    def __init__(self, names: dict[str, str]):
        self.names, self.system = names, ThreadedResolver()

    async def resolve(self, host, port=0, family=socket.AF_INET):
        if host in self.names:
            return [{"hostname": host, "host": self.names[host], "port": port, "family": socket.AF_INET,
                     "proto": 0, "flags": socket.AI_NUMERICHOST}]
        return await self.system.resolve(host, port, family)

    async def close(self):
        await self.system.close()


def session(**kwargs) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5), **kwargs)


async def get_text(client: aiohttp.ClientSession, url: str, **kwargs) -> str:
    async with client.get(url, **kwargs) as response:
        assert response.status == 200, (url, response.status, await response.text())
        return await response.text()


async def barrier(proxy: HttpProxy, port: int) -> None:
    """A request through the proxy, awaited in the proxy's log: every earlier proxied connection
    is then in ``proxy.targets()`` too (the log is read in order).  Its own session, so that it
    opens a new connection to the proxy (pproxy logs connections, not requests)."""
    async with session() as client:
        await get_text(client, f"http://localhost:{port}/barrier", proxy=proxy.url)
    proxy.wait_for_target(f"localhost:{port}")


def test_proxy_forwards_plain_http(http_proxy):
    async def main():
        async with serve() as port, session() as client:
            body = await get_text(client, f"http://127.0.0.1:{port}/via-proxy", proxy=http_proxy.url)
            assert body == f"http 127.0.0.1:{port} /via-proxy"
            http_proxy.wait_for_target(f"127.0.0.1:{port}")
            # A direct request is not in the proxy's log.
            http_proxy.clear()
            assert await get_text(client, f"http://127.0.0.1:{port}/direct") == f"http 127.0.0.1:{port} /direct"
            await barrier(http_proxy, port)
            assert http_proxy.targets() == [f"localhost:{port}"]

    run(main())


def test_proxy_tunnels_https_with_connect(http_proxy, tls):
    server_context, client_context = tls

    async def main():
        async with serve(server_context) as port, session() as client:
            body = await get_text(client, f"https://127.0.0.1:{port}/secret", proxy=http_proxy.url,
                                  ssl=client_context)
            assert body == f"https 127.0.0.1:{port} /secret"  # TLS end to end: only a tunnel does that
            http_proxy.wait_for_target(f"127.0.0.1:{port}")

    run(main())


def test_proxy_from_environment_includes_loopback(http_proxy, tls, clean_proxy_env):
    """HTTP_PROXY / HTTPS_PROXY with trust_env=True: 127.0.0.1 and localhost are proxied (aiohttp
    and urllib make no exception for loopback); trust_env=False ignores the variables."""
    server_context, client_context = tls
    clean_proxy_env.setenv("HTTP_PROXY", http_proxy.url)
    clean_proxy_env.setenv("HTTPS_PROXY", http_proxy.url)

    async def main():
        async with serve() as http_port, serve(server_context) as https_port:
            async with session(trust_env=True) as client:
                assert await get_text(client, f"http://127.0.0.1:{http_port}/env") == f"http 127.0.0.1:{http_port} /env"
                http_proxy.wait_for_target(f"127.0.0.1:{http_port}")
                await get_text(client, f"https://127.0.0.1:{https_port}/env", ssl=client_context)
                http_proxy.wait_for_target(f"127.0.0.1:{https_port}")
                await get_text(client, f"https://localhost:{https_port}/env", ssl=client_context)
                http_proxy.wait_for_target(f"localhost:{https_port}")
            http_proxy.clear()
            async with session(trust_env=False) as client:  # the default: variables ignored
                await get_text(client, f"http://127.0.0.1:{http_port}/no-env")
                await get_text(client, f"https://127.0.0.1:{https_port}/no-env", ssl=client_context)
                await barrier(http_proxy, http_port)
            assert http_proxy.targets() == [f"localhost:{http_port}"]

    run(main())


def test_no_proxy_excludes_a_host(http_proxy, tls, clean_proxy_env):
    """NO_PROXY=excluded.test: that host is reached direct (the proxy could not even resolve it),
    127.0.0.1 still through the proxy; NO_PROXY=127.0.0.1 then sends 127.0.0.1 direct too."""
    server_context, client_context = tls
    clean_proxy_env.setenv("HTTP_PROXY", http_proxy.url)
    clean_proxy_env.setenv("HTTPS_PROXY", http_proxy.url)
    clean_proxy_env.setenv("NO_PROXY", EXCLUDED)

    async def main():
        async with serve() as http_port, serve(server_context) as https_port:
            connector = aiohttp.TCPConnector(resolver=StaticResolver({EXCLUDED: "127.0.0.1"}))
            async with session(trust_env=True, connector=connector) as client:
                body = await get_text(client, f"http://{EXCLUDED}:{http_port}/direct")
                assert body == f"http {EXCLUDED}:{http_port} /direct"
                await get_text(client, f"https://{EXCLUDED}:{https_port}/direct", ssl=client_context)
                await get_text(client, f"http://127.0.0.1:{http_port}/proxied")
                http_proxy.wait_for_target(f"127.0.0.1:{http_port}")
                await barrier(http_proxy, http_port)
                assert http_proxy.targets() == [f"127.0.0.1:{http_port}", f"localhost:{http_port}"]

                http_proxy.clear()
                clean_proxy_env.setenv("NO_PROXY", f"{EXCLUDED},127.0.0.1")  # read at each request
                await get_text(client, f"http://127.0.0.1:{http_port}/direct-now")
                await get_text(client, f"https://127.0.0.1:{https_port}/direct-now", ssl=client_context)
                await barrier(http_proxy, http_port)
                assert http_proxy.targets() == [f"localhost:{http_port}"]

    run(main())


def test_http_proxy_start_stop():
    with HttpProxy() as proxy:
        port = proxy.port
        assert proxy.url == f"http://127.0.0.1:{port}" and proxy.process.poll() is None
        assert proxy.targets() == []
    assert proxy.process.poll() is not None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
