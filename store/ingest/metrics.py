"""The ingest service's ``/metrics`` (Prometheus text format, version 0.0.4) and ``/healthz``
(the JSON of ``Ingestor.health()``: 200 when healthy, else 503), served on one local port."""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:  # (service imports this module)
    from .service import Ingestor

# The per-source counters of /metrics: (metric name after workitem_store_, help, SessionStats field).
SESSION_COUNTERS = (
    ("notifications_received_total", "Notifications received from GWS (redeliveries included).", "received"),
    ("notifications_stored_total", "Notifications made durable (log or spool) and so acknowledged.", "stored"),
    ("notifications_appended_total", "Notification rows appended to event_log.", "appended"),
    ("notifications_duplicate_total", "Appended rows marked duplicate.", "duplicates"),
    ("notifications_quarantined_total", "Appended rows quarantined.", "quarantined"),
    ("batches_not_durable_total", "Batches refused because the spool was full (not acknowledged).", "not_durable"),
    ("snapshots_total", "Workitem snapshots stored.", "snapshots"),
    ("snapshot_failures_total", "Workitem snapshots that could not be read.", "snapshot_failures"),
)


async def serve(ingestor: Ingestor, host: str, port: int) -> web.AppRunner:
    """Serve /healthz and /metrics of ``ingestor`` on host:port (0: any free port); the caller
    reads the port from the runner's addresses and calls its cleanup() at the end."""

    async def healthz(_request):
        body = ingestor.health()
        return web.json_response(body, status=200 if body["status"] == "ok" else 503,
                                 dumps=lambda v: json.dumps(v, default=str))

    async def metrics(_request):
        return web.Response(text=metrics_text(ingestor), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"}, charset="utf-8")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def metrics_text(ingestor: Ingestor) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    health, now = ingestor.health(), time.time()
    sessions = ingestor.sessions
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")

    def per_source(get):
        return [({"source": s.source}, get(s)) for s in sessions]

    def single(value):
        return [] if value is None else [({}, value)]

    p = "workitem_store_"
    for name, help_text, field in SESSION_COUNTERS:
        family(p + name, "counter", help_text, per_source(lambda s, f=field: getattr(s.stats, f)))
    family(p + "handshakes_total", "counter", "Bayeux handshakes.", per_source(lambda s: s.client.handshakes))
    family(p + "reconnects_total", "counter",
           "Sessions or connections re-established after a loss.", per_source(lambda s: s.client.reconnects))
    family(p + "connected", "gauge", "1 while the session's last /meta/connect succeeded.",
           per_source(lambda s: int(s.client.connected)))
    family(p + "connection_state_seconds", "gauge",
           "Seconds since the session's connection state (connected or not) last changed.",
           per_source(lambda s: now - s.client.connected_since))
    family(p + "last_message_age_seconds", "gauge", "Seconds since the session last received a message.",
           [({"source": s.source}, now - s.client.last_message_at) for s in sessions
            if s.client.last_message_at is not None])
    log_, spool = health["log"], health["spool"]
    family(p + "log_writable", "gauge", "1 while the log can be written.", single(int(log_["writable"])))
    family(p + "seconds_since_last_commit", "gauge", "Seconds since the last successful commit to the log.",
           single(log_["seconds_since_last_commit"]))
    family(p + "log_head_seq", "gauge", "seq of the last event_log row seen.", single(log_["head_seq"]))
    family(p + "spool_bytes", "gauge", "Bytes in the spool not yet in the log.", single(spool["bytes"]))
    family(p + "spool_oldest_age_seconds", "gauge", "Age of the oldest spooled entry (0: none).",
           single(spool["oldest_age_seconds"] or 0))
    family(p + "projection_lag_rows", "gauge", "Log head minus the projections' checkpoint.",
           single(health["projection"]["lag_rows"]))
    family(p + "projection_errors", "gauge",
           "Log rows the projections skipped (table projection_errors).",
           single(health["projection"]["skipped_rows"]))
    sealed = health["seals"] or {}  # (no samples when sealing is not configured)
    family(p + "seals_total", "counter", "Seals of the log's head made by this process.",
           single(sealed.get("made")))
    family(p + "seal_failures_total", "counter", "Seals that failed (tried again at the next interval).",
           single(sealed.get("failures")))
    family(p + "seal_failing", "gauge", "1 while the last seal attempt failed.",
           single(None if not sealed else int(sealed["error"] is not None)))
    family(p + "last_seal_seq", "gauge", "seq of the log's head at the last seal made.",
           single(sealed.get("last_seq")))
    family(p + "seconds_since_last_seal", "gauge", "Seconds since the last seal made.",
           single(sealed.get("seconds_since_last_seal")))
    family(p + "healthy", "gauge", "1 when /healthz answers 200.", single(int(health["status"] == "ok")))
    return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    return repr(round(float(value), 6))
