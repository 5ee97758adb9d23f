"""Bounds checked before any heavy work: the request body's size (before it is
parsed) and the prompt's length (before it is tokenized)."""

from __future__ import annotations

import json

from tpi.master.serve.errors import ApiError
from tpi.master.serve.protocol import error_body

DEFAULT_MAX_REQUEST_BYTES = 2_000_000  # a 128K-token prompt fits; a 20 MB body does not


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is answered 413 and never buffered
    whole (Content-Length is checked first, a chunked body is counted as it comes)."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def _reject(self, send) -> None:
        body = json.dumps(
            error_body(f"request body larger than {self.limit} bytes", code="request_too_large")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0
        started = rejected = False

        async def counted():
            nonlocal seen, rejected
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    if not started and not rejected:
                        rejected = True
                        await self._reject(send)
                    # To the app the client has left (an exception raised here would
                    # reach it as a body it failed to parse: a 400), and whatever it
                    # answers now is dropped.
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message):
            nonlocal started
            if rejected:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, tracked)


def check_prompt_chars(text_chars: int, context: int, max_token_chars: int) -> None:
    """Refuse a prompt that cannot fit without tokenizing it: every token covers at
    most `max_token_chars` characters, so it needs at least chars / that many."""
    if text_chars > context * max_token_chars:
        raise ApiError(
            400,
            f"the prompt has {text_chars} characters, more than a context window of "
            f"{context} tokens can hold",
            code="context_length_exceeded",
        )
