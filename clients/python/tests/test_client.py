"""The library against the real relay: lobby, rooms and tokens, verify mode,
heartbeats past the timeout, bye, asyncio and IPv6. Every wait is bounded."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Optional

import pytest

import udphub

SECRET = "a room secret of some length, for the tests"
#: How long a test waits for a message that should come.
WAIT = 5.0


def recv_until(c: udphub.Client, want: bytes, wait: float = WAIT) -> bytes:
    """The first message containing ``want``, within ``wait`` (fails otherwise)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        msg = c.recv(timeout=max(0.01, deadline - time.monotonic()))
        if msg is not None and want in msg:
            return msg
    pytest.fail(f"no message with {want!r} within {wait}s")


def secret_file(tmp_path) -> str:
    path = tmp_path / "room.secret"
    path.write_text(SECRET + "\n")
    return str(path)


def test_two_clients_talk_in_the_lobby(relay):
    """Two clients in the lobby hear each other, rendered as the seeds' server did; close leaves."""
    r = relay()
    with udphub.Client(r.addr) as a, udphub.Client(r.addr) as b:
        assert a.relay_timeout == 10.0 and not a.verified
        r.wait_metric("udphub_clients", 2)
        a.send("hello")
        msg = recv_until(b, b"hello")
        assert msg.startswith(b"hello. from 127.0.0.1:")
        b.send(b"\xffbytes")
        assert recv_until(a, b"bytes").startswith(b"\xffbytes. from ")
    assert r.wait_metric("udphub_clients_left_total", 2) == 2
    assert r.wait_metric("udphub_clients", 0) == 0


def test_rooms_with_minted_tokens_and_a_refused_one(relay, tmp_path):
    """A token from mint_token admits to its room; a room's messages stay in it; a bad token is JoinRefused('token')."""
    r = relay("--room-secret-file", secret_file(tmp_path))
    secret = udphub.read_secret(tmp_path / "room.secret")
    assert secret == SECRET.encode()
    tok = udphub.mint_token(secret, room="red", ttl=60)
    with udphub.Client(r.addr, room="red", token=tok) as a, udphub.Client(
        r.addr, room="red", token=udphub.mint_token(SECRET, room="red", ttl=60)
    ) as b, udphub.Client(r.addr) as lobby:
        a.send("in red")
        assert recv_until(b, b"in red")
        assert lobby.recv(timeout=0.3) is None
    for bad in (udphub.mint_token("another secret entirely", room="red"), udphub.mint_token(SECRET, room="blue"), None):
        with pytest.raises(udphub.JoinRefused) as refused:
            udphub.Client(r.addr, room="red", token=bad)
        assert refused.value.reason == "token"
        assert "token" in str(refused.value)
    with pytest.raises(ValueError, match="room name"):
        udphub.Client(r.addr, room="no spaces")


def test_a_closed_lobby_is_said_not_suffered(relay, tmp_path):
    """A roomless client of a relay with --lobby closed gets JoinRefused saying so, not silence."""
    r = relay("--room-secret-file", secret_file(tmp_path), "--lobby", "closed")
    with pytest.raises(udphub.JoinRefused, match="lobby is closed") as refused:
        udphub.Client(r.addr)
    assert refused.value.reason == "token"

    async def main() -> None:
        with pytest.raises(udphub.JoinRefused, match="lobby is closed"):
            async with udphub.AsyncClient(r.addr):
                pass

    asyncio.run(main())
    with udphub.Client(r.addr, room="red", token=udphub.mint_token(SECRET, room="red")) as c:
        c.send("inside")
        assert recv_until(c, b"inside")


def test_the_stdlib_minter_is_hs256_and_matches_pyjwt(monkeypatch):
    """Without PyJWT the hmac minter makes an HS256 JWT (RFC 7519); with PyJWT, the same token byte for byte."""
    import base64
    import hashlib
    import hmac
    import json
    import sys

    try:
        import jwt
    except ImportError:
        jwt = None
    monkeypatch.setitem(sys.modules, "jwt", None)
    plain = udphub.mint_token(SECRET, room="red", ttl=60, now=1_700_000_000)
    monkeypatch.undo()
    header, body, signature = plain.split(".")
    unb64 = lambda s: base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))  # noqa: E731
    assert json.loads(unb64(header)) == {"alg": "HS256", "typ": "JWT"}
    assert json.loads(unb64(body)) == {"room": "red", "iat": 1_700_000_000, "exp": 1_700_000_060}
    want = hmac.new(SECRET.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    assert unb64(signature) == want
    if jwt is not None and hasattr(jwt, "encode"):
        assert udphub.mint_token(SECRET, room="red", ttl=60, now=1_700_000_000) == plain


def test_verify_mode_handshake_and_messages(relay, tmp_path):
    """In verify mode the client proves its address with the cookie, joins, talks, and quits proven."""
    r = relay("--verify-sources", "--room-secret-file", secret_file(tmp_path))
    tok = udphub.mint_token(SECRET, room="ops")
    with udphub.Client(r.addr, room="ops", token=tok) as a, udphub.Client(r.addr, room="ops", token=tok) as b:
        assert a.verified and b.verified
        a.send("proven")
        assert recv_until(b, b"proven")
        with udphub.Client(r.addr) as lobby:
            assert lobby.verified
            r.wait_metric("udphub_clients", 3)
        assert r.wait_metric("udphub_clients", 2) == 2, "the lobby client's proven quit"
        with pytest.raises(udphub.JoinRefused) as refused:
            udphub.Client(r.addr, room="ops", token=udphub.mint_token(SECRET, room="dev"))
        assert refused.value.reason == "token"
    assert r.wait_metric("udphub_clients", 0) == 0
    assert r.metric("udphub_clients_left_total") == 3


def test_heartbeats_keep_a_silent_client_past_three_timeouts(relay):
    """A relay with --timeout 2s: a silent client is still a member after 7 s, in both modes."""
    plain = relay("--timeout", "2s")
    proven = relay("--timeout", "2s", "--verify-sources")
    with udphub.Client(plain.addr, room="quiet") as a, udphub.Client(proven.addr, room="quiet") as v:
        assert a.relay_timeout == 2.0 and a.heartbeat_interval < 1.0
        assert v.verified
        time.sleep(7.0)  # the thing under test: three timeouts of silence
        with udphub.Client(plain.addr, room="quiet") as b, udphub.Client(proven.addr, room="quiet") as w:
            b.send("still there?")
            w.send("still there?")
            assert recv_until(a, b"still there?")
            assert recv_until(v, b"still there?")
    assert plain.metric("udphub_clients_expired_total") == 0
    assert proven.metric("udphub_clients_expired_total") == 0


def test_bye_on_sigterm_ends_recv(relay):
    """The relay's bye (SIGTERM) makes recv raise RelayClosed, and again after."""
    r = relay()
    with udphub.Client(r.addr) as c:
        r.wait_metric("udphub_clients", 1)
        assert r.stop() == 0
        with pytest.raises(udphub.RelayClosed):
            for _ in range(100):
                c.recv(timeout=WAIT)
        with pytest.raises(udphub.RelayClosed):
            c.recv(timeout=0)


async def arecv_until(c: udphub.AsyncClient, want: bytes, wait: float = WAIT) -> bytes:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        msg = await c.recv(timeout=max(0.01, deadline - time.monotonic()))
        if msg is not None and want in msg:
            return msg
    pytest.fail(f"no message with {want!r} within {wait}s")


def test_asyncio_client_basics(relay, tmp_path):
    """AsyncClient: lobby, a room with a token, a refusal, verify mode, heartbeats past the timeout, bye."""
    r = relay("--timeout", "2s", "--room-secret-file", secret_file(tmp_path))
    v = relay("--timeout", "2s", "--verify-sources")

    async def main() -> None:
        tok = udphub.mint_token(SECRET, room="red")
        async with udphub.AsyncClient(r.addr, room="red", token=tok) as a, udphub.AsyncClient(
            r.addr, room="red", token=tok
        ) as b:
            await a.send("hi")
            assert (await arecv_until(b, b"hi")).startswith(b"hi. from 127.0.0.1:")
        with pytest.raises(udphub.JoinRefused) as refused:
            async with udphub.AsyncClient(r.addr, room="red", token="not.a.token"):
                pass
        assert refused.value.reason == "token"
        async with udphub.AsyncClient(v.addr) as a, udphub.AsyncClient(v.addr) as b:
            assert a.verified
            await asyncio.sleep(5.0)  # past two timeouts of silence
            await a.send("proven")
            await arecv_until(b, b"proven")
            v.stop()
            with pytest.raises(udphub.RelayClosed):
                for _ in range(100):
                    await b.recv(timeout=WAIT)

    asyncio.run(main())
    assert r.wait_metric("udphub_clients_left_total", 2) == 2
    assert v.proc.returncode == 0


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6(relay):
    """A relay on [::1]: both clients talk, and the address is shown in brackets."""
    r = relay(bind="[::1]:0")
    assert r.addr.startswith("[::1]:")
    with udphub.Client(r.addr, room="six") as a, udphub.Client(r.addr, room="six") as b:
        a.send("over v6")
        assert recv_until(b, b"over v6").startswith(b"over v6. from [::1]:")

    async def main() -> None:
        async with udphub.AsyncClient(r.addr) as c:
            await c.send("async v6")
            await arecv_until(c, b"async v6")

    asyncio.run(main())


def test_addresses_and_arguments_are_checked():
    """Bad addresses and arguments say what is wrong before anything is sent."""
    from udphub import _addr

    assert _addr.split("[::1]:9999") == ("::1", 9999)
    assert _addr.split("localhost") == ("localhost", 9999)
    for bad, why in (("::1:9999", "brackets"), ("127.0.0.1:x", "not a number"), (":9", "no host")):
        with pytest.raises(ValueError, match=why):
            _addr.split(bad)
    with pytest.raises(ValueError, match="room="):
        udphub.Client("127.0.0.1:9", token="t")
