"""The exceptions a client raises, each saying what happened and what fixes it."""

from __future__ import annotations

from typing import Optional


class Error(Exception):
    """Base of every udphub client error."""


class JoinRefused(Error):
    """The relay refused to let us into the room.

    ``reason`` is the relay's word: ``token`` (missing, expired, for
    another room, or signed with another secret), ``full`` (the room, or
    the relay's room count, is at its cap) or ``name`` (not a room name).
    """

    def __init__(self, reason: str, room: Optional[str] = None) -> None:
        self.reason = reason
        self.room = room
        where = f"room {room!r}" if room is not None else "the room"
        if room is None and reason == "token":
            super().__init__(
                "token: the relay's lobby is closed (serve --lobby closed): lines outside a room "
                "are dropped; pass room= and token= (minted with the relay's room secret)"
            )
            return
        why = {
            "token": "needs a valid token (missing, expired, for another room, or minted with another secret)",
            "full": "is full, or the relay has as many rooms as it allows; try again later",
            "name": "is not a name the relay accepts (1 to 64 of A-Z a-z 0-9 _ . : -)",
        }.get(reason, f"was refused ({reason})")
        super().__init__(f"{reason}: {where} {why}")

    def __reduce__(self):  # keeps (reason, room) through pickling
        return (type(self), (self.reason, self.room))


class RelayClosed(Error):
    """The relay said ``bye``: it is shutting down. The end of the stream."""


class NoAnswer(Error, TimeoutError):
    """The relay did not answer in time (nothing listens, or it is not udphub)."""


class ClientClosed(Error):
    """The client was closed; it sends and receives nothing more."""
