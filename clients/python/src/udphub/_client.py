"""The blocking client: a socket, and one daemon thread that heartbeats and reads.

The thread reads every datagram, answers the relay's control words (a
renewed cookie, the timeout) and queues the messages for :meth:`Client.recv`,
so a client that only sends is kept alive and proven all the same.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from typing import Callable, Deque, Optional, TypeVar, Union

from . import _addr, _wire
from ._errors import ClientClosed, JoinRefused, NoAnswer, RelayClosed

T = TypeVar("T")

#: How long to wait for an answer before asking again: a lost datagram
#: costs this much, not the whole wait (as ``udphub chat``).
RETRY = 0.25
#: The most messages held for :meth:`Client.recv`; beyond it the oldest is
#: dropped and counted in :attr:`Client.dropped` (a reader that never
#: reads must not grow without bound).
DEFAULT_QUEUE = 10_000
#: How often the thread wakes to notice :meth:`Client.close`.
_POLL = 0.1
#: A datagram is at most this long (UDP over IPv4).
_RECV_BUF = 65_535


class _Inbox:
    """A bounded queue of messages, ending in an exception (``bye``, a refusal)."""

    def __init__(self, limit: int) -> None:
        self._items: Deque[Union[bytes, BaseException]] = collections.deque()
        self._limit = limit
        self._cond = threading.Condition()
        #: Messages dropped because the queue was full.
        self.dropped = 0

    def put(self, item: Union[bytes, BaseException]) -> None:
        with self._cond:
            if len(self._items) >= self._limit:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()

    def get(self, timeout: Optional[float]) -> Optional[Union[bytes, BaseException]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            item = self._items[0]
            # An ending stays, so every later recv() says it again.
            if not isinstance(item, RelayClosed):
                self._items.popleft()
            return item


def _lobby_answer(e: _wire.Event) -> Optional[bool]:
    """The answer to :meth:`~udphub._wire.Link.join_lobby`: raises for a closed lobby."""
    if e.kind == "denied":
        raise JoinRefused(e.data.decode("ascii"), None)
    return True if e.kind == "room" else None


class Client:
    """A member of a udphub relay, in the lobby or in ``room``.

    Connects on construction: asks the relay's timeout, does the verify-mode
    handshake when the relay asks for it, joins ``room`` (with ``token``
    for a relay with a room secret), then heartbeats from a daemon thread
    until :meth:`close`. Use it as a context manager::

        with udphub.Client("127.0.0.1:9999", room="red", token=tok) as c:
            c.send("hello")
            msg = c.recv(timeout=1.0)

    ``heartbeat`` is in seconds (default: 5 s, or a third of the relay's
    timeout if that is shorter, or 1 s in verify mode where the relay does
    not say); ``wait`` bounds each handshake step. Raises
    :class:`JoinRefused` when the relay refuses the room, :class:`NoAnswer`
    when it never answers a join, ``ValueError`` for a bad address or room
    name.
    """

    def __init__(
        self,
        addr: _addr.Address,
        room: Optional[str] = None,
        token: Optional[str] = None,
        *,
        heartbeat: Optional[float] = None,
        wait: float = 2.0,
        max_datagram: int = _wire.DEFAULT_MAX_DATAGRAM,
        queue_size: int = DEFAULT_QUEUE,
    ) -> None:
        if room is not None and not _wire.valid_room(room):
            raise ValueError(f"room {room!r}: a room name is 1 to 64 of A-Z a-z 0-9 _ . : -")
        if token is not None and room is None:
            raise ValueError("a token is for a room: pass room= too")
        if heartbeat is not None and heartbeat <= 0:
            raise ValueError(f"heartbeat={heartbeat!r}: it must be a positive number of seconds")
        family, self.address = _addr.resolve(addr)
        self.max_datagram = max_datagram
        self._link = _wire.Link(
            room=room, token=token.strip() if token else None, heartbeat_wanted=heartbeat
        )
        self._inbox = _Inbox(queue_size)
        self._stop = threading.Event()
        self._closed = False
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            # Connected: the kernel drops datagrams from anyone but the relay.
            self._sock.connect(self.address)
            self._handshake(wait)
        except BaseException:
            self._closed = True
            self._sock.close()
            raise
        self._sock.settimeout(_POLL)
        self._thread = threading.Thread(target=self._run, name="udphub-heartbeat", daemon=True)
        self._thread.start()

    # -- what the caller sees ------------------------------------------------

    @property
    def room(self) -> Optional[str]:
        """The room joined, or ``None`` for the lobby."""
        return self._link.room

    @property
    def verified(self) -> bool:
        """Whether the relay runs in verify mode (we hold its cookie)."""
        return self._link.cookie is not None

    @property
    def relay_timeout(self) -> Optional[float]:
        """The relay's ``--timeout`` in seconds, if it said."""
        return self._link.relay_timeout

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats, as now chosen."""
        return self._link.heartbeat_every()

    @property
    def dropped(self) -> int:
        """Messages dropped because nobody called :meth:`recv` for ``queue_size`` of them."""
        return self._inbox.dropped

    def send(self, message: Union[str, bytes]) -> None:
        """Sends one message (a ``str`` is sent as UTF-8) to the room.

        Raises ``ValueError`` if it is longer than ``max_datagram`` (the
        relay would drop it), :class:`ClientClosed` after :meth:`close`.
        """
        data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
        if len(data) > self.max_datagram:
            raise ValueError(
                f"message of {len(data)} bytes is longer than max_datagram={self.max_datagram} "
                "(the relay's --max-datagram): the relay would drop it"
            )
        if self._closed:
            raise ClientClosed("send() on a closed udphub.Client")
        self._send(data)

    def recv(self, timeout: Optional[float] = None) -> Optional[bytes]:
        """The next message, as the relay rendered it (``--format``), or ``None`` after ``timeout`` seconds.

        ``timeout=None`` waits for ever. Raises :class:`RelayClosed` once the
        relay has said ``bye`` (and on every call after), :class:`JoinRefused`
        if the relay later refused to take us back into our room,
        :class:`ClientClosed` after :meth:`close` with nothing left queued.
        """
        item = self._inbox.get(0 if self._closed else timeout)
        if item is None:
            if self._closed:
                raise ClientClosed("recv() on a closed udphub.Client")
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Leaves the relay (``quit``, proven with the cookie in verify mode) and stops the heartbeat."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        try:
            self._send(self._link.quit())
        finally:
            self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        where = f"room {self.room!r}" if self.room is not None else "the lobby"
        return f"<udphub.Client {self.address!r} in {where}{' (verified)' if self.verified else ''}>"

    # -- the handshake -------------------------------------------------------

    def _send(self, data: bytes) -> None:
        try:
            self._sock.send(data)
        except ConnectionRefusedError:
            # An ICMP "port unreachable" from an earlier datagram: nothing
            # listens yet. UDP promises nothing; the heartbeat keeps trying.
            pass

    def _ask(
        self, request: Callable[[], bytes], wait: float, understood: Callable[[_wire.Event], Optional[T]]
    ) -> Optional[T]:
        """Sends ``request()`` every :data:`RETRY` until ``understood`` makes
        something of an answer, for at most ``wait``; messages that arrive
        meanwhile are queued. ``None`` on silence."""
        deadline = time.monotonic() + wait
        ask_at = 0.0
        refused = False
        while True:
            now = time.monotonic()
            if now >= deadline:
                if refused:
                    raise NoAnswer(f"nothing is listening at {self.address!r}: is the relay running?")
                return None
            if now >= ask_at:
                # Called each time: a cookie that came meanwhile goes with it.
                self._send(request())
                ask_at = now + RETRY
            self._sock.settimeout(max(0.001, min(deadline, ask_at) - now))
            try:
                data = self._sock.recv(_RECV_BUF)
            except socket.timeout:
                continue
            except ConnectionRefusedError:
                refused = True
                continue
            event, _ = self._link.handle(data)
            if event.kind == "message":
                self._inbox.put(data)
                continue
            if event.kind == "bye":
                raise RelayClosed(f"the relay at {self.address!r} said bye: it is shutting down")
            answer = understood(event)
            if answer is not None:
                return answer

    def _handshake(self, wait: float) -> None:
        link = self._link
        # The relay's timeout (and registration in the lobby), or its cookie.
        self._ask(link.probe, min(wait, 0.5), lambda e: True if e.kind in ("timeout", "cookie") else None)
        if link.room is None:
            if link.relay_timeout is None:
                # No timeout answer (verify mode, or a closed lobby, which
                # answers non-members nothing): is the lobby open? A closed
                # one would drop our lines in silence.
                self._ask(link.join_lobby, min(wait, 0.5), _lobby_answer)
            if link.cookie is not None:
                self._send(link.register())
            return
        want = link.room.encode()

        def joined(e: _wire.Event) -> Optional[bool]:
            if e.kind == "denied":
                raise JoinRefused(e.data.decode("ascii"), link.room)
            return True if e.kind == "room" and e.data == want else None

        if not self._ask(link.join, wait, joined):
            raise NoAnswer(
                f"no answer from {self.address!r} to joining room {link.room!r} within {wait}s: "
                "is it a udphub relay that knows rooms?"
            )

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        link = self._link
        next_beat = time.monotonic() + link.heartbeat_every()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self._send(link.heartbeat())
                next_beat = now + link.heartbeat_every()
            try:
                data = self._sock.recv(_RECV_BUF)
            except socket.timeout:
                continue
            except ConnectionRefusedError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(_POLL)
                continue
            before = link.heartbeat_every()
            event, reply = link.handle(data)
            if reply is not None:
                self._send(reply)
            if event.kind == "message":
                self._inbox.put(data)
            elif event.kind == "bye":
                self._inbox.put(RelayClosed(f"the relay at {self.address!r} said bye: it is shutting down"))
                return
            elif event.kind == "denied":
                self._inbox.put(JoinRefused(event.data.decode("ascii"), link.room))
            elif event.kind == "timeout" and link.heartbeat_every() < before:
                next_beat = min(next_beat, time.monotonic() + link.heartbeat_every())
