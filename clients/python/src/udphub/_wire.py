"""The wire protocol, sans I/O: what to send and what a datagram means.

Byte for byte what docs/PROTOCOL.md says and `udphub chat` sends. Both
clients (the thread one and the asyncio one) drive a :class:`Link`; it
never touches a socket, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

#: A heartbeat outside verify mode.
HEARTBEAT = b"^hb^"
#: Leaving, outside verify mode.
QUIT = b"quit"
#: What the relay sends every member when it shuts down.
BYE = b"bye"
#: Asks the relay's ``--timeout`` (answered ``^timeout^MS``).
TIMEOUT_QUERY = b"^timeout^"
#: Joins a room: ``^join^ROOM[^TOKEN]``.
JOIN = b"^join^"
#: The relay's answer to an accepted join: ``^room^ROOM``.
ROOM_REPLY = b"^room^"
#: The relay's answer to a refused join: ``^denied^REASON``.
DENIED_REPLY = b"^denied^"
#: Verify mode: asks for a cookie (padded to :data:`HELLO_LEN`).
HELLO = b"^hello^"
#: Verify mode: the cookie, ``^cookie^C``, alone or before ``^join^…``/``^quit``.
COOKIE = b"^cookie^"
#: The relay answers a datagram with at most as many bytes as it got; a
#: cookie (30 bytes) or a timeout answer fits in 64.
HELLO_LEN = 64
#: Joins are padded to this, so that any refusal (``^denied^token`` is 14
#: bytes) fits in the answer.
JOIN_LEN = 32
#: The largest datagram a default relay accepts (``--max-datagram``): the
#: payload of a 1500-byte Ethernet frame. Longer ones are dropped.
DEFAULT_MAX_DATAGRAM = 1472

_ROOM_NAME = re.compile(rb"[A-Za-z0-9_.:-]{1,64}\Z")
# A cookie is 22 base64url characters: anything else after `^cookie^` is a
# message (e.g. someone's text under `--format raw`), not a cookie.
_COOKIE = re.compile(rb"[A-Za-z0-9_-]{22}\Z")
_TIMEOUT_ANSWER = re.compile(rb"\^timeout\^([0-9]{1,12})\Z")
_REASON = re.compile(rb"[a-z_]{1,32}\Z")


def valid_room(name: str) -> bool:
    """Whether the relay accepts ``name`` as a room: 1 to 64 of ``A-Z a-z 0-9 _ . : -``."""
    return bool(_ROOM_NAME.match(name.encode("utf-8", "replace")))


def padded(data: bytes, length: int) -> bytes:
    """``data`` with trailing spaces up to ``length`` bytes (the relay trims them)."""
    return data + b" " * max(0, length - len(data))


@dataclass
class Event:
    """What one datagram from the relay means.

    ``kind`` is one of ``message`` (``data`` is the datagram), ``bye``,
    ``cookie`` (``data`` is the cookie), ``timeout`` (``seconds``), ``room``
    (``data`` is the room name) or ``denied`` (``data`` is the reason).
    """

    kind: str
    data: bytes = b""
    seconds: float = 0.0


def classify(datagram: bytes) -> Event:
    """Tells a relay's control answer from a message."""
    if datagram == BYE:
        return Event("bye")
    if datagram.startswith(COOKIE) and _COOKIE.match(datagram[len(COOKIE) :]):
        return Event("cookie", datagram[len(COOKIE) :])
    m = _TIMEOUT_ANSWER.match(datagram)
    if m:
        return Event("timeout", seconds=int(m.group(1)) / 1000.0)
    if datagram.startswith(ROOM_REPLY):
        name = datagram[len(ROOM_REPLY) :]
        if name == b"" or _ROOM_NAME.match(name):
            return Event("room", name)
    if datagram.startswith(DENIED_REPLY) and _REASON.match(datagram[len(DENIED_REPLY) :]):
        return Event("denied", datagram[len(DENIED_REPLY) :])
    return Event("message", datagram)


@dataclass
class Link:
    """One client's protocol state: its room, token, cookie and heartbeat.

    The I/O side asks it what to send (:meth:`probe`, :meth:`join`,
    :meth:`heartbeat`, :meth:`quit`) and hands it what arrives
    (:meth:`handle`), which may say what to answer.
    """

    room: Optional[str] = None
    token: Optional[str] = None
    #: The heartbeat the caller asked for, or ``None`` for "choose".
    heartbeat_wanted: Optional[float] = None
    #: Verify mode: the latest cookie from the relay.
    cookie: Optional[bytes] = None
    #: The relay's ``--timeout``, once it said.
    relay_timeout: Optional[float] = None
    #: The room we are in, by the relay's last word (``b""``: the lobby).
    joined: Optional[bytes] = field(default=None)
    #: Whether the relay has answered the probe (with its timeout or a
    #: cookie): until then we do not know whether it is in verify mode.
    answered: bool = False

    def probe(self) -> bytes:
        """The first datagram: ``^timeout^`` padded to 64 bytes.

        A udphub relay answers ``^timeout^MS`` (and registers us in the
        lobby), or in verify mode ``^cookie^C`` (registering nobody yet).
        """
        return padded(TIMEOUT_QUERY, HELLO_LEN)

    def hello(self) -> bytes:
        """Verify mode: asks for a fresh cookie (``^hello^`` padded to 64 bytes)."""
        return padded(HELLO, HELLO_LEN)

    def _proof(self) -> bytes:
        return COOKIE + self.cookie if self.cookie is not None else b""

    def join_suffix(self) -> bytes:
        """``^join^ROOM[^TOKEN]``, or nothing for the lobby."""
        if self.room is None:
            return b""
        request = JOIN + self.room.encode()
        if self.token is not None:
            request += b"^" + self.token.encode()
        return request

    def join(self) -> bytes:
        """``[^cookie^C]^join^ROOM[^TOKEN]``, padded so that a refusal fits.

        To 32 bytes; to 64 while the relay has not answered the probe, so
        that a relay in verify mode answers it with a cookie.
        """
        return padded(self._proof() + self.join_suffix(), JOIN_LEN if self.answered else HELLO_LEN)

    def join_lobby(self) -> bytes:
        """``[^cookie^C]^join^``, padded: asks whether the lobby is open
        (a closed one, ``serve --lobby closed``, answers ``^denied^token``)."""
        return padded(self._proof() + JOIN, JOIN_LEN)

    def register(self) -> bytes:
        """Verify mode, lobby: the bare proof ``^cookie^C``, which registers us."""
        return self._proof()

    def heartbeat(self) -> bytes:
        """The heartbeat: ``^hb^``, or in verify mode ``^cookie^C`` padded to 64.

        Padded so that a relay that no longer knows the cookie (it
        restarted) can answer it with a fresh one.
        """
        if self.cookie is not None:
            return padded(self._proof(), HELLO_LEN)
        if not self.answered:
            # Silence so far (lost, or the relay was not up yet): ask
            # again, so a relay in verify mode answers with a cookie.
            return self.probe()
        return HEARTBEAT

    def quit(self) -> bytes:
        """Leaving: ``quit``, or in verify mode the proven ``^cookie^C^quit``."""
        if self.cookie is not None:
            return self._proof() + b"^quit"
        return QUIT

    def heartbeat_every(self) -> float:
        """Seconds between heartbeats.

        Asked-for, or 5 s (the seeds'); lowered to a third of the relay's
        timeout when that is less than twice it (as ``udphub chat`` does).
        In verify mode the relay does not tell its timeout (a member's
        ``^timeout^`` proves nothing and is ignored), so without an asked-for
        interval it is 1 s: 64 bytes a second keeps a client alive on any
        sane ``--timeout``.
        """
        every = self.heartbeat_wanted
        if every is None:
            every = 1.0 if self.cookie is not None and self.relay_timeout is None else 5.0
        if self.relay_timeout is not None and every > self.relay_timeout / 2:
            every = max(self.relay_timeout / 3, 0.01)
        return every

    def handle(self, datagram: bytes) -> Tuple[Event, Optional[bytes]]:
        """What ``datagram`` means, and what to answer it with, if anything.

        A cookie is kept, and answered with the proof and our room's join:
        a renewed cookie (the relay renews them on heartbeats) or a relay
        that does not know us (it restarted, or expired us) both end with
        us proven and back in our room.
        """
        event = classify(datagram)
        reply: Optional[bytes] = None
        if event.kind == "cookie":
            self.answered = True
            self.cookie = event.data
            reply = self.join() if self.room is not None else self.register()
        elif event.kind == "timeout":
            self.answered = True
            self.relay_timeout = event.seconds
        elif event.kind == "room":
            self.answered = True
            self.joined = event.data
        return event, reply
