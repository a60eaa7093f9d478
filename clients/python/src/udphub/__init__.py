"""udphub: a client for the udphub UDP group-chat relay.

Everything ``udphub chat`` does, as a library: the ``^timeout^`` question
and heartbeats below the relay's timeout, rooms and their tokens, the
verify-mode handshake (``--public`` relays) with its cookie heartbeats and
renewals, ``bye`` as the end of the stream, IPv6.

::

    import udphub
    with udphub.Client("127.0.0.1:9999", room="red", token=tok) as c:
        c.send("hello")
        msg = c.recv(timeout=1.0)      # bytes, or None on timeout

The wire protocol is docs/PROTOCOL.md in the udphub repository.
"""

from ._aio import AsyncClient
from ._client import Client
from ._errors import ClientClosed, Error, JoinRefused, NoAnswer, RelayClosed
from ._token import mint_token, read_secret

__all__ = [
    "AsyncClient",
    "Client",
    "ClientClosed",
    "Error",
    "JoinRefused",
    "NoAnswer",
    "RelayClosed",
    "mint_token",
    "read_secret",
]

__version__ = "0.1.0"
