"""The asyncio client: a datagram endpoint, and a task that heartbeats.

The endpoint's protocol answers the relay's control words as they arrive
(a renewed cookie, the timeout) and queues the messages for
:meth:`AsyncClient.recv`; the same sans-I/O :class:`~udphub._wire.Link`
as the blocking client decides what is sent.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Callable, Deque, Optional, Union

from . import _addr, _wire
from ._client import DEFAULT_QUEUE, RETRY, _lobby_answer
from ._errors import ClientClosed, JoinRefused, NoAnswer, RelayClosed


class _Protocol(asyncio.DatagramProtocol):
    """Hands every datagram (and ICMP errors) to its client."""

    def __init__(self, client: "AsyncClient") -> None:
        self._client = client

    def datagram_received(self, data: bytes, addr: object) -> None:
        self._client._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP "port unreachable": nothing listens yet; UDP promises
        # nothing, and the heartbeat keeps trying.
        self._client._refused = True


class AsyncClient:
    """The asyncio twin of :class:`udphub.Client`: same arguments, same behaviour.

    ::

        async with udphub.AsyncClient("127.0.0.1:9999", room="red") as c:
            await c.send("hi")
            msg = await c.recv(timeout=1.0)

    Connects in ``async with`` (or ``await c.connect()``); heartbeats from
    a task until :meth:`close`.
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
        self._addr = addr
        self.address: Optional[tuple] = None
        self.max_datagram = max_datagram
        self._wait = wait
        self._link = _wire.Link(
            room=room, token=token.strip() if token else None, heartbeat_wanted=heartbeat
        )
        self._limit = queue_size
        self._messages: Deque[Union[bytes, BaseException]] = collections.deque()
        self._arrived: Optional[asyncio.Event] = None
        # While connecting: the control answers, for the handshake to read.
        self._control: Optional["asyncio.Queue[_wire.Event]"] = None
        self._transport: Optional[asyncio.DatagramTransport] = None
        self._beat: Optional["asyncio.Task[None]"] = None
        self._wake: Optional[asyncio.Event] = None
        self._refused = False
        self._closed = False
        #: Messages dropped because nobody called :meth:`recv` for ``queue_size`` of them.
        self.dropped = 0

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

    async def connect(self) -> "AsyncClient":
        """Does the handshake (probe, verify mode, join) and starts the heartbeat task.

        Raises :class:`JoinRefused`, :class:`NoAnswer` or ``ValueError`` as
        :class:`udphub.Client` does.
        """
        if self._transport is not None:
            return self
        loop = asyncio.get_running_loop()
        family, self.address = await loop.run_in_executor(None, _addr.resolve, self._addr)
        self._arrived = asyncio.Event()
        self._wake = asyncio.Event()
        self._control = asyncio.Queue()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), remote_addr=self.address[:2], family=family
        )
        try:
            await self._handshake()
        except BaseException:
            self._closed = True
            self._transport.close()
            raise
        self._control = None
        self._beat = loop.create_task(self._heartbeat(), name="udphub-heartbeat")
        return self

    async def send(self, message: Union[str, bytes]) -> None:
        """Sends one message (a ``str`` as UTF-8); raises as :meth:`udphub.Client.send`."""
        data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
        if len(data) > self.max_datagram:
            raise ValueError(
                f"message of {len(data)} bytes is longer than max_datagram={self.max_datagram} "
                "(the relay's --max-datagram): the relay would drop it"
            )
        if self._closed or self._transport is None:
            raise ClientClosed("send() on a closed or unconnected udphub.AsyncClient")
        self._send(data)

    async def recv(self, timeout: Optional[float] = None) -> Optional[bytes]:
        """The next message, or ``None`` after ``timeout`` seconds; raises as :meth:`udphub.Client.recv`."""
        if self._arrived is None:
            raise ClientClosed("recv() on an unconnected udphub.AsyncClient: use async with, or await connect()")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._messages:
            if self._closed:
                raise ClientClosed("recv() on a closed udphub.AsyncClient")
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return None
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return None
        item = self._messages[0]
        if not isinstance(item, RelayClosed):
            self._messages.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        """Leaves (``quit``, proven in verify mode) and stops the heartbeat task."""
        if self._closed:
            return
        self._closed = True
        if self._beat is not None:
            self._beat.cancel()
            try:
                await self._beat
            except asyncio.CancelledError:
                pass
        if self._transport is not None:
            self._send(self._link.quit())
            self._transport.close()
        if self._arrived is not None:
            self._arrived.set()

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        where = f"room {self.room!r}" if self.room is not None else "the lobby"
        return f"<udphub.AsyncClient {self._addr!r} in {where}{' (verified)' if self.verified else ''}>"

    # -- inside --------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(data)

    def _queue(self, item: Union[bytes, BaseException]) -> None:
        if len(self._messages) >= self._limit:
            self._messages.popleft()
            self.dropped += 1
        self._messages.append(item)
        if self._arrived is not None:
            self._arrived.set()

    def _on_datagram(self, data: bytes) -> None:
        self._refused = False
        before = self._link.heartbeat_every()
        event, reply = self._link.handle(data)
        if event.kind == "message":
            self._queue(data)
            return
        if event.kind == "bye":
            self._queue(RelayClosed(f"the relay at {self.address!r} said bye: it is shutting down"))
            if self._control is not None:
                self._control.put_nowait(event)
            return
        if self._control is not None:
            # Connecting: the handshake decides what to answer.
            self._control.put_nowait(event)
            return
        if reply is not None:
            self._send(reply)
        if event.kind == "denied":
            self._queue(JoinRefused(event.data.decode("ascii"), self._link.room))
        elif event.kind == "timeout" and self._link.heartbeat_every() < before and self._wake is not None:
            self._wake.set()

    async def _ask(self, request: Callable[[], bytes], wait: float, understood: Callable[[_wire.Event], bool]) -> bool:
        """Sends ``request()`` every :data:`RETRY` until ``understood`` accepts an answer, for at most ``wait``."""
        assert self._control is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while loop.time() < deadline:
            self._send(request())
            ask_until = min(deadline, loop.time() + RETRY)
            while True:
                left = ask_until - loop.time()
                if left <= 0:
                    break
                try:
                    event = await asyncio.wait_for(self._control.get(), left)
                except asyncio.TimeoutError:
                    break
                if event.kind == "bye":
                    raise RelayClosed(f"the relay at {self.address!r} said bye: it is shutting down")
                if understood(event):
                    return True
        if self._refused:
            raise NoAnswer(f"nothing is listening at {self.address!r}: is the relay running?")
        return False

    async def _handshake(self) -> None:
        link = self._link
        await self._ask(link.probe, min(self._wait, 0.5), lambda e: e.kind in ("timeout", "cookie"))
        if link.room is None:
            if link.relay_timeout is None:
                # Is the lobby open? (as Client does)
                await self._ask(link.join_lobby, min(self._wait, 0.5), lambda e: bool(_lobby_answer(e)))
            if link.cookie is not None:
                self._send(link.register())
            return
        want = link.room.encode()

        def joined(e: _wire.Event) -> bool:
            if e.kind == "denied":
                raise JoinRefused(e.data.decode("ascii"), link.room)
            return e.kind == "room" and e.data == want

        if not await self._ask(link.join, self._wait, joined):
            raise NoAnswer(
                f"no answer from {self.address!r} to joining room {link.room!r} within {self._wait}s: "
                "is it a udphub relay that knows rooms?"
            )

    async def _heartbeat(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._link.heartbeat_every())
                continue  # a shorter interval learnt: wait that instead
            except asyncio.TimeoutError:
                pass
            self._send(self._link.heartbeat())
