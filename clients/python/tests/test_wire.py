"""The wire bytes, sans I/O, and cookie renewal through the heartbeat thread
(against a scripted relay: a real relay renews only every 2 to 4 minutes)."""

from __future__ import annotations

import socket
import threading
import time

import udphub
from udphub import _wire

C1 = b"A" * 22
C2 = b"B" * 22


def test_requests_are_padded_as_the_protocol_says():
    """The probe and proven heartbeats are 64 bytes, joins 32 (64 before any answer), quits proven."""
    link = _wire.Link(room="red", token="t.o.k")
    assert link.probe() == b"^timeout^".ljust(64)
    assert link.join() == b"^join^red^t.o.k".ljust(64), "no answer yet: a verify relay must hear it"
    link.handle(b"^timeout^10000")
    assert link.relay_timeout == 10.0 and link.join() == b"^join^red^t.o.k".ljust(32)
    assert link.heartbeat() == b"^hb^" and link.quit() == b"quit"
    event, reply = link.handle(b"^cookie^" + C1)
    assert event.kind == "cookie" and reply == b"^cookie^" + C1 + b"^join^red^t.o.k"
    assert link.heartbeat() == (b"^cookie^" + C1).ljust(64)
    assert link.quit() == b"^cookie^" + C1 + b"^quit"
    lobby = _wire.Link()
    assert lobby.handle(b"^cookie^" + C1)[1] == b"^cookie^" + C1


def test_messages_are_not_mistaken_for_control_words():
    """Only well-formed control answers are control: a chat line is a message."""
    kinds = {
        b"bye": "bye",
        b"bye. from 127.0.0.1:5": "message",
        b"^cookie^short": "message",
        b"^timeout^2000": "timeout",
        b"^timeout^2000. from 1.2.3.4:5": "message",
        b"^room^red": "room",
        b"^room^": "room",
        b"^denied^full": "denied",
        b"^denied^no way": "message",
    }
    for data, kind in kinds.items():
        assert _wire.classify(data).kind == kind, data


def test_heartbeat_follows_the_relay_timeout():
    """5 s by default, a third of a short timeout, 1 s in verify mode where the timeout is unknown."""
    link = _wire.Link()
    assert link.heartbeat_every() == 5.0
    link.handle(b"^timeout^2000")
    assert abs(link.heartbeat_every() - 2 / 3) < 1e-9
    verify = _wire.Link()
    verify.handle(b"^cookie^" + C1)
    assert verify.heartbeat_every() == 1.0


def test_a_renewed_cookie_replaces_the_old_one_in_heartbeats_and_quit():
    """The thread keeps the relay's fresh cookie: heartbeats and the quit carry it."""
    relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay.bind(("127.0.0.1", 0))
    relay.settimeout(5.0)
    port = relay.getsockname()[1]
    made = {}
    t = threading.Thread(target=lambda: made.setdefault("c", udphub.Client(f"127.0.0.1:{port}", heartbeat=0.1)))
    t.start()
    try:
        probe, peer = relay.recvfrom(2048)
        assert probe == b"^timeout^".ljust(64)
        relay.sendto(b"^cookie^" + C1, peer)
        assert relay.recv(2048) == (b"^cookie^" + C1 + b"^join^").ljust(32), "asks whether the lobby is open"
        relay.sendto(b"^room^", peer)
        assert relay.recv(2048) == b"^cookie^" + C1, "registers with the cookie"
        t.join(5.0)
        c = made["c"]
        assert c.verified
        assert relay.recv(2048) == (b"^cookie^" + C1).ljust(64)
        relay.sendto(b"^cookie^" + C2, peer)
        seen = set()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            beat = relay.recv(2048)
            seen.add(beat)
            if beat == (b"^cookie^" + C2).ljust(64):
                break
        assert (b"^cookie^" + C2).ljust(64) in seen
        relay.sendto(b"hello. from 127.0.0.1:1", peer)
        assert c.recv(timeout=5.0) == b"hello. from 127.0.0.1:1"
        c.close()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if relay.recv(2048) == b"^cookie^" + C2 + b"^quit":
                break
        else:
            raise AssertionError("no proven quit with the new cookie")
    finally:
        t.join(5.0)
        if "c" in made:
            made["c"].close()
        relay.close()
