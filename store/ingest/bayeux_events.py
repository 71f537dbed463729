"""What a Bayeux client (ingest/bayeux.py) tells its ``on_event`` callback, so that a caller can
record where messages may be missing.

Events are awaited, in order with the batches: ``started`` after each successful handshake and
subscription, before any message of that session is handed on; ``lost`` when a session that had
started is known to be gone (402, handshake advice, a refused connect, or, without the ack
extension, a failed connect: the messages of a lost reply are gone), with ``since`` the last
moment it was known to be followed; ``resumed`` when, without the ack extension, the same
session answers again after such a failure; ``ended`` after a clean ``/meta/disconnect``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SessionEvent:
    """A change in what the client follows (times are epoch seconds)."""

    kind: str  # "started" | "resumed" | "lost" | "ended"
    client_id: str
    at: float
    ack: bool = False  # the ack extension is on for this session
    handshake_at: float | None = None  # started: when the handshake request was sent
    since: float | None = None  # lost: the last moment the session was known to be followed
    cause: str | None = None  # lost, resumed: what happened


OnEvent = Callable[[SessionEvent], Awaitable[None]]


class SessionEvents:
    """Tells each event when it is due, once: ``following`` is True from "started" (or
    "resumed") until "lost" or "ended"; ``followed_at`` is the last moment the session was
    known alive (``alive()``), the ``since`` of a "lost"."""

    def __init__(self, on_event: OnEvent | None):
        self._on_event = on_event
        self.following = False
        self.followed_at = 0.0

    async def _tell(self, event: SessionEvent) -> None:
        if self._on_event is not None:
            await self._on_event(event)

    def alive(self) -> None:
        self.followed_at = time.time()

    async def start(self, client_id: str, ack: bool, handshake_at: float) -> None:
        """A new session is followed from now; raises what ``on_event`` raised (then nothing of
        the session may be handed on)."""
        self.alive()
        await self._tell(SessionEvent("started", client_id, self.followed_at, ack, handshake_at=handshake_at))
        self.following = True

    async def resume(self, client_id: str, ack: bool) -> None:
        """The session answered: if a failure had been told as "lost", following goes on from now."""
        self.alive()
        if not self.following:
            self.following = True
            await self._tell(SessionEvent("resumed", client_id, self.followed_at, ack,
                                          cause="the same session answered again"))

    async def lose(self, client_id: str, ack: bool, cause: str) -> None:
        """The followed session is gone (told once)."""
        if self.following:
            self.following = False
            await self._tell(SessionEvent("lost", client_id, time.time(), ack, since=self.followed_at, cause=cause))

    async def end(self, client_id: str, ack: bool) -> None:
        """The followed session was ended by the client."""
        if self.following:
            self.following = False
            await self._tell(SessionEvent("ended", client_id, time.time(), ack,
                                          cause="the client stopped (/meta/disconnect)"))
