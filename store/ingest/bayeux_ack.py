"""The Bayeux ack extension, client side (as CometD's own ``AckExtension``): what makes a batch
that was not stored come again.

With the extension (the server answers the handshake with ``ext.ack: true``, or with
``{"enabled": true, "batch": N}`` as the Java server does when it delivers during the handshake)
every connect reply numbers its batch in ``ext.ack``, and the next connect sends back the number
of the last batch whose callback *returned*: a batch whose callback raised, or that never
arrived, is sent again by the server within the same server session.  The queue of a server
session dies with it: nothing published while no session existed is ever delivered.
"""

from __future__ import annotations

from typing import Any


class AckExtension:
    """The extension's state for one client: asked for (``requested``), granted for the current
    session (``enabled``), and the last batch handed safely on (``acked``; -1: none yet)."""

    def __init__(self, requested: bool = True):
        self.requested = requested
        self.enabled = False
        self.acked = -1

    def on_handshake(self, message: dict[str, Any]) -> None:
        """A new session: nothing granted or acknowledged yet; ask for the extension."""
        self.enabled, self.acked = False, -1
        if self.requested:
            message["ext"] = {"ack": True}

    def on_handshake_reply(self, reply: dict[str, Any]) -> None:
        ext = reply.get("ext")
        ack = ext.get("ack") if isinstance(ext, dict) else None
        # "true", or {"enabled": true, "batch": N} (Java AcknowledgedMessagesSessionExtension with
        # message delivery during the handshake: the reply closes batch N, acknowledged as any).
        self.enabled = self.requested and (ack is True or (isinstance(ack, dict) and ack.get("enabled") is True))

    def on_connect(self, message: dict[str, Any]) -> None:
        if self.enabled:
            message["ext"] = {"ack": self.acked}

    def batch_of(self, reply: dict[str, Any]) -> int | None:
        """The number of the batch ``reply`` closes, if it says one.  (A handshake reply is read
        before the extension is known to be granted: its batch counts only if it is.)"""
        if not self.enabled and reply.get("channel") != "/meta/handshake":
            return None
        ext = reply.get("ext")
        batch = ext.get("ack") if isinstance(ext, dict) else None
        if isinstance(batch, dict):  # the handshake's object form
            batch = batch.get("batch")
        return batch if isinstance(batch, int) and not isinstance(batch, bool) else None

    def acknowledge(self, number: int | None) -> None:
        """Batch ``number`` was handed on safely: the next connect says so."""
        if number is not None and self.enabled:
            self.acked = number
