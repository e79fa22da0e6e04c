"""Who may use the server: bearer-token auth as pure ASGI middleware, the token file, and the rule
that only loopback addresses may be served without a token.

The token is compared in constant time (both sides hashed, so not even its length leaks); a token file
others may read is refused, as ssh refuses such a private key.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from ..errors import UsageError
from .problems import problem_response

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class BearerAuth:
    """Pure ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>`` (401 otherwise)."""

    def __init__(self, app, token: str):
        self.app = app
        self.digest = hashlib.sha256(token.encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._authorized(scope):
            return await self.app(scope, receive, send)
        resp = problem_response(401, "missing or wrong bearer token",
                                "send the header 'Authorization: Bearer TOKEN' with the token from the server's --token-file",
                                {"WWW-Authenticate": 'Bearer realm="unetsegment"'})
        await resp(scope, receive, send)

    def _authorized(self, scope) -> bool:
        auth = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        # hash both sides: the comparison is constant-time and leaks not even the token's length
        return bool(given) and hmac.compare_digest(hashlib.sha256(given).digest(), self.digest)


def read_token_file(path: str | os.PathLike) -> str:
    """The bearer token in ``path``; refused, as ssh refuses a private key, when others may read the file."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        if os.name == "posix" and mode & 0o077:
            raise UsageError(f"token file {p} is accessible by other users (mode {mode & 0o777:04o})",
                             f"chmod 600 {p}")
        token = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read token file {p}: {e}", "give a readable text file holding the token") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise UsageError(f"token file {p} must hold one token of at least 16 characters without spaces",
                         "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > token.txt && chmod 600 token.txt")
    return token


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if host not in LOOPBACK and token is None:
        raise UsageError(f"refusing to listen on {host} without authentication",
                         "give --token-file (and put TLS in front, or use --ssl-certfile/--ssl-keyfile), or bind to 127.0.0.1")
