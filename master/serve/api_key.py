"""The API key check, as plain ASGI middleware: unlike a BaseHTTPMiddleware it
passes the client's disconnects through untouched, so a request whose client
has gone is cancelled however its answer was to be sent."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from tpi.errors import TpiError
from tpi.master.serve.protocol import error_body

OPEN_PATHS = ("/health", "/", "/favicon.ico")  # no API key needed


class ApiKeyCheck:
    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        given = header[7:] if header[:7].lower() == b"bearer " else b""
        if secrets.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        body = json.dumps(
            error_body("invalid or missing API key", "authentication_error", "invalid_api_key")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def api_key_from(value: str | None) -> str | None:
    """--api-key, or $TPI_API_KEY; a value starting with @ names a file holding it."""
    key = value or os.environ.get("TPI_API_KEY")
    if key and key.startswith("@"):
        path = Path(key[1:]).expanduser()
        try:
            key = path.read_text().strip()
        except OSError as e:
            raise TpiError(f"cannot read the API key file {path}: {e.strerror or e}") from None
        if not key:
            # Taken for "no key", it would open the server to everyone.
            raise TpiError(f"the API key file {path} is empty")
    return key or None
