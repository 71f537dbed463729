"""``project --follow``: project again and again, until SIGINT or SIGTERM (or a stop event)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from sqlalchemy import Engine

from .runner import ProjectResult, project


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM (the handlers are installed now, in the main thread)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def follow(engine: Engine, interval: float, on_applied: Callable[[ProjectResult], None],
           stop: threading.Event | None = None) -> ProjectResult:
    """Bring the projections up to date every ``interval`` seconds until ``stop`` is set (by
    default: until SIGINT or SIGTERM); ``on_applied`` gets each run that applied or rebuilt
    something.  Returns the last run, made after the stop."""
    stop = stop if stop is not None else stop_on_signals()
    while True:
        result = project(engine)
        if result.applied or result.rebuilt:
            on_applied(result)
        if stop.wait(interval):
            break
    return project(engine)
