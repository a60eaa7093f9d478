"""Relay addresses: ``"127.0.0.1:9999"``, ``"[::1]:9999"``, ``"host:9999"`` or a tuple."""

from __future__ import annotations

import socket
from typing import Tuple, Union

#: What a client accepts as the relay's address.
Address = Union[str, Tuple[str, int]]

#: The seeds' port, used when the address names none.
DEFAULT_PORT = 9999


def split(addr: Address) -> Tuple[str, int]:
    """``(host, port)`` from an address; IPv6 literals in brackets, ``[::1]:9999``."""
    if isinstance(addr, tuple):
        return addr[0], int(addr[1])
    text = addr.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"relay address {addr!r}: an IPv6 address goes in brackets, e.g. [::1]:9999")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    elif ":" in text:
        raise ValueError(f"relay address {addr!r}: put an IPv6 address in brackets, e.g. [{text}]:9999")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"relay address {addr!r} has no host, e.g. 127.0.0.1:9999")
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"relay address {addr!r}: the port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise ValueError(f"relay address {addr!r}: the port must be 1 to 65535")
    return host, number


def resolve(addr: Address) -> Tuple[int, tuple]:
    """The socket family and address of the relay (the first the resolver gives)."""
    host, port = split(addr)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise ValueError(f"relay address {addr!r}: cannot resolve {host!r}: {e}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr
