"""Demonstrations: ``run``, the live demo (a simulated GWS server on loopback, a live ingest of
its agents with the ingest service's own code, then verify and a few questions answered in SQL),
and ``serve_simulator``, the simulated GWS server alone until interrupted."""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, func, select, text

from . import db
from . import verify as verify_mod
from .db import StoreError
from .gws_simulator import GwsSimulator
from .ingest.config import SessionConfig
from .ingest.service import Ingestor
from .schema import event_log

QUERIES = {
    "workitems by state": "SELECT state, COUNT(*) AS workitems FROM workitems GROUP BY state ORDER BY 2 DESC",
    "failed requests by error code": (
        "SELECT error_code, COUNT(*) AS requests FROM request_outcomes WHERE outcome = 'failed' "
        "GROUP BY error_code ORDER BY 2 DESC"),
    "most frequent transitions": (
        "SELECT from_state, to_state, COUNT(*) AS n FROM workitem_transitions "
        "GROUP BY from_state, to_state ORDER BY 3 DESC LIMIT 5"),
}
STORE_DEADLINE = 30.0  # seconds to wait, after the simulator finished, for what it published to be stored


@dataclass(frozen=True)
class AgentResult:
    source: str
    published: int
    stored: int
    handshakes: int
    lost: int  # published while no session listened, or lost with a session


@dataclass(frozen=True)
class Answer:
    title: str
    sql: str
    rows: list[tuple]


@dataclass(frozen=True)
class DemoResult:
    agents: list[AgentResult]
    verify: verify_mod.VerifyReport
    answers: list[Answer]


def run(engine: Engine, *, seconds: float, agents: int, rate: float,
        on_start: Callable[[str, int], None] | None = None) -> DemoResult:
    """Publish ``seconds * rate`` notifications from ``agents`` simulated agents, follow them
    live into the store ``engine`` until everything published is stored (at most
    STORE_DEADLINE seconds after the last), then verify the store and answer QUERIES.

    ``on_start(server URL, notifications to publish)`` is called once the simulator listens.
    A later run on the same store adds sessions of its own (sources agent-001#2, ...).
    """
    with engine.connect() as conn:
        run_number = 1 + conn.execute(select(func.count(func.distinct(event_log.c.source)))
                                      .where(event_log.c.source.like("agent-001%"))).scalar_one()
    events = max(1, int(seconds * rate))

    async def live() -> list[AgentResult]:
        # Publishing starts once every agent's session listens: a CometD server keeps nothing for
        # a session that does not exist yet, so an earlier start would lose the first messages.
        async with GwsSimulator(agents=agents, rate=rate, events=events, seed=run_number, csrf=True,
                                wait_for_sessions=True) as server:
            if on_start is not None:
                on_start(server.url, events)
            configs = [SessionConfig(server.url, name, server.password,
                                     name if run_number == 1 else f"{name}#{run_number}")
                       for name in server.agents]
            ingestor = Ingestor(engine, configs)
            following = asyncio.create_task(ingestor.run())
            finished = asyncio.create_task(server.finished.wait())
            await asyncio.wait([finished, following], return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()

            def storable() -> int:  # published minus what no session could have stored
                return sum(server.published[n] - server.lost[n] - server.discarded[n] for n in server.agents)

            deadline = time.monotonic() + STORE_DEADLINE
            while (sum(s.stats.appended for s in ingestor.sessions) < storable()
                   and time.monotonic() < deadline and not following.done()):
                await asyncio.sleep(0.05)  # polling the counters, with a deadline
            ingestor.stop()
            await following
            return [AgentResult(s.source, server.published[s.config.user], s.stats.appended, s.client.handshakes,
                                server.lost[s.config.user] + server.discarded[s.config.user])
                    for s in ingestor.sessions]

    results = asyncio.run(live())
    with db.snapshot(engine) as conn:
        report = verify_mod.verify(conn)
        answers = [Answer(title, sql, [tuple(row) for row in conn.execute(text(sql))])
                   for title, sql in QUERIES.items()]
    return DemoResult(results, report, answers)


@dataclass(frozen=True)
class SimulatorCounts:
    published: int
    delivered: int
    lost: int  # published while the agent had no session listening


def serve_simulator(*, port: int, agents: int, password: str, tls_cert: str | None = None,
                    tls_key: str | None = None, on_listening: Callable[[GwsSimulator], None] | None = None,
                    **options) -> SimulatorCounts:
    """Serve the GWS simulator (``options``: GwsSimulator's) on 127.0.0.1:``port`` until SIGINT
    or SIGTERM; https with the certificate chain ``tls_cert`` and its key ``tls_key``.
    ``on_listening(simulator)`` is called once it listens.  Returns what it published."""
    ssl_context = None
    if tls_cert is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(tls_cert, tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise StoreError(f"cannot use {tls_cert} / {tls_key}: {exc}") from exc

    async def serve() -> SimulatorCounts:
        gws = GwsSimulator(agents=agents, password=password, port=port, ssl_context=ssl_context, **options)
        try:
            await gws.start()
        except OSError as exc:
            raise StoreError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from exc
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            if on_listening is not None:
                on_listening(gws)
            await stop.wait()
        finally:
            await gws.stop()
        return SimulatorCounts(sum(gws.published.values()), sum(gws.delivered.values()), sum(gws.lost.values()))

    return asyncio.run(serve())
