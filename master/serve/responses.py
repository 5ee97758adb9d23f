"""Answering one queued generation in an endpoint's shape: whole, or streamed
as server-sent events (one chunk per piece of text)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from tpi.master.serve.errors import ApiError, generation_error
from tpi.master.serve.jobs import Job
from tpi.master.serve.protocol import error_body, new_id, now

DISCONNECT_CHECK_S = 1.0  # how often a quiet stream checks whether its client left


@dataclass(frozen=True)
class Endpoint:
    """How one OpenAI endpoint shapes its answers."""

    id_prefix: str
    object: str
    chunk_object: str
    opening: dict | None  # the first streamed delta, before any text
    # (delta {"content": text}, finish_reason, streamed) -> one element of "choices"
    choice: Callable[[dict, str | None, bool], dict]


def _chat_choice(delta: dict, reason: str | None, streamed: bool) -> dict:
    if streamed:
        return {"index": 0, "delta": delta, "finish_reason": reason}
    message = {"role": "assistant", "content": delta["content"]}
    return {"index": 0, "message": message, "finish_reason": reason}


def _text_choice(delta: dict, reason: str | None, streamed: bool) -> dict:
    text = delta.get("content", "")
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}


CHAT = Endpoint(
    "chatcmpl",
    "chat.completion",
    "chat.completion.chunk",
    {"role": "assistant", "content": ""},
    _chat_choice,
)
TEXT = Endpoint("cmpl", "text_completion", "text_completion", None, _text_choice)


def usage(job: Job) -> dict:
    return {
        "prompt_tokens": len(job.prompt_ids),
        "completion_tokens": job.stats.new_tokens,
        "total_tokens": len(job.prompt_ids) + job.stats.new_tokens,
    }


class Answer:
    """One job's answer, in `endpoint`'s shape, for `model_name`."""

    def __init__(self, job: Job, endpoint: Endpoint, model_name: str) -> None:
        self.job = job
        self.endpoint = endpoint
        self.model_name = model_name
        self.id, self.created = new_id(endpoint.id_prefix), now()
        self._checked = time.monotonic()  # when the client was last seen connected

    def _envelope(self, object_: str, delta: dict, reason: str | None, streamed: bool) -> dict:
        return {
            "id": self.id,
            "object": object_,
            "created": self.created,
            "model": self.model_name,
            "choices": [self.endpoint.choice(delta, reason, streamed)],
        }

    def _chunk(self, delta: dict, reason: str | None) -> str:
        envelope = self._envelope(self.endpoint.chunk_object, delta, reason, True)
        return f"data: {json.dumps(envelope)}\n\n"

    async def _next_event(self, request: Request) -> tuple[str, object] | None:
        """The job's next event, or None once the client has gone (the job is then
        cancelled: the engine stops at the next token, streamed or not). The client
        is checked at least every DISCONNECT_CHECK_S, also while tokens flow."""
        while True:
            if time.monotonic() - self._checked >= DISCONNECT_CHECK_S:
                self._checked = time.monotonic()
                if await request.is_disconnected():
                    self.job.cancel.set()
                    return None
            with contextlib.suppress(asyncio.TimeoutError):
                return await asyncio.wait_for(self.job.events.get(), DISCONNECT_CHECK_S)

    async def whole(self, request: Request) -> dict | None:
        parts = []
        try:
            while True:
                event = await self._next_event(request)
                if event is None:
                    return None
                kind, value = event
                if kind == "text":
                    parts.append(value)
                elif kind == "done":
                    break
                else:
                    raise generation_error(value)
        finally:
            self.job.cancel.set()
        body = self._envelope(self.endpoint.object, {"content": "".join(parts)}, value, False)
        return {**body, "usage": usage(self.job)}

    async def stream(self, request: Request, include_usage: bool) -> StreamingResponse | None:
        """The streamed answer, once its first event is in: a failure before any text
        (cluster down, prompt too long) is still an HTTP error status, not a 200."""
        first = await self._next_event(request)
        if first is None:
            return None
        if first[0] == "error":
            self.job.cancel.set()
            raise generation_error(first[1])
        return StreamingResponse(
            self._events(request, include_usage, first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(self, request: Request, include_usage: bool, first: tuple):
        job = self.job
        try:
            if self.endpoint.opening is not None:
                yield self._chunk(self.endpoint.opening, None)
            event = first
            while event is not None:
                kind, value = event
                if kind == "text":
                    yield self._chunk({"content": value}, None)
                elif kind == "done":
                    yield self._chunk({}, "stop" if value == "cancelled" else value)
                    if include_usage:
                        final = self._envelope(self.endpoint.chunk_object, {}, None, True)
                        final["choices"] = []
                        final["usage"] = usage(job)
                        yield f"data: {json.dumps(final)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:
                    e: ApiError = generation_error(value)
                    yield f"data: {json.dumps(error_body(str(e), e.type, e.code))}\n\n"
                    return
                event = await self._next_event(request)
        finally:
            job.cancel.set()  # client gone or stream over: free the cluster
