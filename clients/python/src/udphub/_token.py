"""Room tokens: HS256 JSON Web Tokens (RFC 7519) with a ``room`` claim.

PyJWT mints them when it is installed; otherwise the standard library does
(a JWT is base64url JSON and an HMAC-SHA256 over it, nothing more).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from typing import Any, Dict, Optional, Union


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_token(
    secret: Union[str, bytes],
    room: str,
    ttl: float = 3600,
    *,
    now: Optional[float] = None,
    claims: Optional[Dict[str, Any]] = None,
) -> str:
    """A token admitting to ``room`` for ``ttl`` seconds, signed with ``secret``.

    ``secret`` is the relay's room secret: the bytes of its
    ``--room-secret-file`` less one trailing newline (:func:`read_secret`
    reads it so). ``claims`` adds more (``sub``, ``nbf``, ...). Uses PyJWT
    if it is installed, else ``hmac``/``hashlib``.
    """
    if not room:
        raise ValueError("mint_token: room is empty; a token admits to one named room")
    if ttl <= 0:
        raise ValueError(f"mint_token: ttl={ttl!r}; it must be a positive number of seconds")
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("mint_token: the secret is empty (read it with udphub.read_secret(path))")
    issued = time.time() if now is None else now
    payload: Dict[str, Any] = {"room": room, "iat": int(issued), "exp": int(issued + ttl)}
    payload.update(claims or {})
    try:
        import jwt  # PyJWT, optional
    except ImportError:
        jwt = None
    if jwt is not None and hasattr(jwt, "encode"):
        token = jwt.encode(payload, key, algorithm="HS256")
        return token.decode("ascii") if isinstance(token, bytes) else token
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(payload, separators=(",", ":")).encode())
    signing_input = f"{header}.{body}".encode("ascii")
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return f"{header}.{body}.{_b64url(signature)}"


def read_secret(path: Union[str, "os.PathLike[str]"]) -> bytes:
    """The room secret in ``path``, less one trailing newline (as the relay reads it)."""
    with open(path, "rb") as f:
        data = f.read()
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data
