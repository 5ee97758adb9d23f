"""Answering one queued request (its n choices) in an endpoint's shape: whole,
or streamed as server-sent events (one chunk per piece of text of a choice)."""

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
    # (index, delta {"content": text}, finish_reason, streamed) -> one element of "choices"
    choice: Callable[[int, dict, str | None, bool], dict]


def _chat_choice(index: int, delta: dict, reason: str | None, streamed: bool) -> dict:
    if streamed:
        return {"index": index, "delta": delta, "finish_reason": reason}
    message = {"role": "assistant", "content": delta["content"]}
    return {"index": index, "message": message, "finish_reason": reason}


def _text_choice(index: int, delta: dict, reason: str | None, streamed: bool) -> dict:
    text = delta.get("content", "")
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}


CHAT = Endpoint(
    "chatcmpl",
    "chat.completion",
    "chat.completion.chunk",
    {"role": "assistant", "content": ""},
    _chat_choice,
)
TEXT = Endpoint("cmpl", "text_completion", "text_completion", None, _text_choice)


def usage(jobs: list[Job]) -> dict:
    prompt = len(jobs[0].prompt_ids)  # one prompt, however many choices
    completion = sum(j.stats.new_tokens for j in jobs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class Answer:
    """One request's answer (its n jobs, one per choice), in `endpoint`'s shape."""

    def __init__(self, jobs: list[Job], endpoint: Endpoint, model_name: str) -> None:
        self.jobs = jobs
        self.events = jobs[0].events  # shared by the request's jobs, as is cancel
        self.cancel = jobs[0].cancel
        self.endpoint = endpoint
        self.model_name = model_name
        self.id, self.created = new_id(endpoint.id_prefix), now()
        self._checked = time.monotonic()  # when the client was last seen connected

    def _envelope(self, object_: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": object_,
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
        }

    def _chunk(self, index: int, delta: dict, reason: str | None) -> str:
        choice = self.endpoint.choice(index, delta, reason, True)
        return f"data: {json.dumps(self._envelope(self.endpoint.chunk_object, [choice]))}\n\n"

    async def _next_event(self, request: Request) -> tuple[int, str, object] | None:
        """The next event of any of the jobs, or None once the client has gone (the
        jobs are then cancelled: the engine stops them at the next step, streamed or
        not). The client is checked at least every DISCONNECT_CHECK_S, also while
        tokens flow."""
        while True:
            if time.monotonic() - self._checked >= DISCONNECT_CHECK_S:
                self._checked = time.monotonic()
                if await request.is_disconnected():
                    self.cancel.set()
                    return None
            with contextlib.suppress(asyncio.TimeoutError):
                return await asyncio.wait_for(self.events.get(), DISCONNECT_CHECK_S)

    async def whole(self, request: Request) -> dict | None:
        parts: list[list[str]] = [[] for _ in self.jobs]
        reasons: list[str | None] = [None] * len(self.jobs)
        try:
            while any(r is None for r in reasons):
                event = await self._next_event(request)
                if event is None:
                    return None
                index, kind, value = event
                if kind == "text":
                    parts[index].append(value)
                elif kind == "notice":
                    continue  # a recovered loss: the answer goes on
                elif kind == "done":
                    reasons[index] = value
                else:
                    raise generation_error(value)
        finally:
            self.cancel.set()
        choices = [
            self.endpoint.choice(i, {"content": "".join(p)}, reasons[i], False)
            for i, p in enumerate(parts)
        ]
        return {**self._envelope(self.endpoint.object, choices), "usage": usage(self.jobs)}

    async def stream(self, request: Request, include_usage: bool) -> StreamingResponse | None:
        """The streamed answer, once its first event is in: a failure before any text
        (cluster down, prompt too long) is still an HTTP error status, not a 200."""
        first = await self._next_event(request)
        if first is None:
            return None
        while first[1] == "notice":  # a recovery before any text: wait on
            first = await self._next_event(request)
            if first is None:
                return None
        if first[1] == "error":
            self.cancel.set()
            raise generation_error(first[2])
        return StreamingResponse(
            self._events(request, include_usage, first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(self, request: Request, include_usage: bool, first: tuple):
        left = len(self.jobs)
        try:
            if self.endpoint.opening is not None:
                for i in range(len(self.jobs)):
                    yield self._chunk(i, self.endpoint.opening, None)
            event = first
            while event is not None:
                index, kind, value = event
                if kind == "text":
                    yield self._chunk(index, {"content": value}, None)
                elif kind == "notice":  # an SSE comment: clients show nothing, logs keep it
                    yield f": tpi: {value}\n\n"
                elif kind == "done":
                    yield self._chunk(index, {}, "stop" if value == "cancelled" else value)
                    left -= 1
                    if left == 0:
                        if include_usage:
                            final = self._envelope(self.endpoint.chunk_object, [])
                            final["usage"] = usage(self.jobs)
                            yield f"data: {json.dumps(final)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                else:
                    e: ApiError = generation_error(value)
                    yield f"data: {json.dumps(error_body(str(e), e.type, e.code))}\n\n"
                    return
                event = await self._next_event(request)
        finally:
            self.cancel.set()  # client gone or stream over: free the batch slots
