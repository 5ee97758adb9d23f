"""`tpi serve`: an OpenAI-compatible HTTP API and a chat page, for one model
(or cluster) that serves one generation at a time."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from master.generation_queue import GenerationQueue, Job, QueueFull
from master.model_holder import ModelDown, ModelHolder
from master.openai_api import (
    ChatRequest,
    CompletionRequest,
    SamplingFields,
    error_body,
    new_id,
    now,
)
from master.sampling import SamplingParams
from tpi.errors import PromptError, TpiError
from tpi.links import ClusterError

DEFAULT_MAX_TOKENS = 512


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param


@dataclass(frozen=True)
class _Endpoint:
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


CHAT = _Endpoint(
    "chatcmpl",
    "chat.completion",
    "chat.completion.chunk",
    {"role": "assistant", "content": ""},
    _chat_choice,
)
TEXT = _Endpoint("cmpl", "text_completion", "text_completion", None, _text_choice)


def create_app(
    holder: ModelHolder,
    model_name: str,
    defaults: SamplingParams,
    api_key: str | None = None,
    capacity: int = 8,
) -> FastAPI:
    """`holder` holds the LoadedModel (and reconnects it after a failure);
    `defaults` is the command line's sampling."""
    app = FastAPI(title="tpi", version="1", docs_url=None, redoc_url=None)
    loaded = holder.loaded

    def on_error(e: BaseException) -> None:
        if isinstance(e, ClusterError):
            holder.failed(e)

    gen = GenerationQueue(loaded.engine, loaded.tokenizer, capacity, on_error)
    app.state.generation = gen
    tok = loaded.tokenizer
    created = now()

    # --- errors in OpenAI's shape ------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError):
        return JSONResponse(error_body(str(e), e.type, e.code, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, where = "request body is not valid JSON", None
        return JSONResponse(
            error_body(f"{where + ': ' if where else ''}{msg}", param=where or None),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException):
        return JSONResponse(
            error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code
        )

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path not in ("/health", "/", "/favicon.ico"):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                return JSONResponse(
                    error_body(
                        "invalid or missing API key", "authentication_error", "invalid_api_key"
                    ),
                    status_code=401,
                )
        return await call_next(request)

    # --- helpers -------------------------------------------------------------------

    def sampling(req: SamplingFields) -> SamplingParams:
        max_tokens = (
            req.max_completion_tokens
            or req.max_tokens
            or defaults.max_new_tokens
            or DEFAULT_MAX_TOKENS
        )
        return SamplingParams(
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_k=defaults.top_k if req.top_k is None else req.top_k,
            top_p=defaults.top_p if req.top_p is None else req.top_p,
            seed=req.seed,
            max_new_tokens=max_tokens,
        )

    def check_fits(ids: list[int]) -> None:
        limit = loaded.engine.max_positions
        if not ids:
            raise ApiError(400, "the prompt is empty", param="messages")
        if len(ids) >= limit:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; the context window is {limit}",
                code="context_length_exceeded",
            )

    async def submit(ids: list[int], req: SamplingFields) -> Job:
        if holder.error is not None:
            try:  # a worker failed earlier: reconnect (off the event loop; rate-limited)
                current = await asyncio.to_thread(holder.ensure)
            except ModelDown as e:
                raise ApiError(
                    503, f"the cluster is down: {e}", "server_error", "cluster_down"
                ) from None
            gen.engine = current.engine
        try:
            stops = req.stops()
        except ValueError as e:
            raise ApiError(400, str(e), param="stop") from None
        job = Job(ids, sampling(req), stops, asyncio.get_running_loop())
        try:
            gen.submit(job)
        except QueueFull:
            raise ApiError(
                429,
                "too many requests waiting; try again shortly",
                "rate_limit_error",
                "queue_full",
            ) from None
        return job

    async def collect(job: Job) -> tuple[str, str]:
        parts = []
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                parts.append(value)
            elif kind == "done":
                return "".join(parts), value
            else:
                raise_generation_error(value)

    def raise_generation_error(e: BaseException) -> None:
        if isinstance(e, ClusterError):
            raise ApiError(503, f"the cluster is down: {e}", "server_error", "cluster_down")
        if isinstance(e, PromptError):
            raise ApiError(400, str(e), code="context_length_exceeded")
        if isinstance(e, TpiError):
            raise ApiError(500, str(e), "server_error")
        raise ApiError(500, f"internal error: {type(e).__name__}", "server_error")

    def usage(job: Job) -> dict:
        return {
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": job.stats.new_tokens,
            "total_tokens": len(job.prompt_ids) + job.stats.new_tokens,
        }

    def stream(job: Job, request: Request, make_chunk, include_usage: bool, first: dict | None):
        async def events():
            try:
                if first is not None:
                    yield f"data: {json.dumps(make_chunk(first, None))}\n\n"
                while True:
                    try:
                        kind, value = await asyncio.wait_for(job.events.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                    if kind == "text":
                        yield f"data: {json.dumps(make_chunk({'content': value}, None))}\n\n"
                    elif kind == "done":
                        reason = "stop" if value == "cancelled" else value
                        yield f"data: {json.dumps(make_chunk({}, reason))}\n\n"
                        if include_usage:
                            final = make_chunk({}, None)
                            final["choices"] = []
                            final["usage"] = usage(job)
                            yield f"data: {json.dumps(final)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        try:
                            raise_generation_error(value)
                        except ApiError as e:
                            yield f"data: {json.dumps(error_body(str(e), e.type, e.code))}\n\n"
                        return
            finally:
                job.cancel.set()  # client gone or stream over: free the cluster

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # --- routes --------------------------------------------------------------------

    @app.get("/health")
    async def health():
        ranks = [{"rank": 0, "address": "local", "state": "ok"}]
        cluster = holder.loaded.cluster
        if cluster is not None:
            for link in cluster.links.links:
                state = "lost" if link.lost else ("ok" if link.connected else "connecting")
                ranks.append({"rank": link.rank, "address": link.name, "state": state})
        down = holder.error is not None or any(r["state"] == "lost" for r in ranks)
        body = {
            "status": "down" if down else "ok",
            "model": model_name,
            "ranks": ranks,
            "busy": gen.busy,
            "waiting": gen.waiting,
            "recent": list(gen.recent),
        }
        if holder.error is not None:
            body["error"] = holder.error
        return JSONResponse(body, status_code=503 if down else 200)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "tpi"}],
        }

    async def respond(ids, req, request: Request, endpoint: _Endpoint):
        """Queue one generation and answer it in `endpoint`'s shape, streamed or whole."""
        check_fits(ids)
        job = await submit(ids, req)
        cid, ts = new_id(endpoint.id_prefix), now()

        def envelope(object_: str, delta: dict, reason: str | None, streamed: bool) -> dict:
            return {
                "id": cid,
                "object": object_,
                "created": ts,
                "model": model_name,
                "choices": [endpoint.choice(delta, reason, streamed)],
            }

        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(
                job,
                request,
                lambda delta, reason: envelope(endpoint.chunk_object, delta, reason, True),
                include,
                endpoint.opening,
            )
        try:
            text, reason = await collect(job)
        finally:
            job.cancel.set()
        return {**envelope(endpoint.object, {"content": text}, reason, False), "usage": usage(job)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        messages = [
            {"role": m.role if m.role != "developer" else "system", "content": m.content}
            for m in req.messages
        ]
        try:
            if tok.chat_template is not None:
                ids = tok.encode_chat(messages)
            else:
                ids = tok.encode(
                    "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
                )
        except TpiError as e:
            raise ApiError(400, str(e), param="messages") from None
        return await respond(ids, req, request, CHAT)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt if isinstance(req.prompt, str) else "".join(req.prompt)
        if isinstance(req.prompt, list) and len(req.prompt) != 1:
            raise ApiError(400, "prompt lists must hold exactly one prompt", param="prompt")
        ids = tok.encode(prompt)
        return await respond(ids, req, request, TEXT)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("master").joinpath("static/chat.html").read_text()

    @app.on_event("shutdown")
    async def _shutdown():
        gen.close()

    app.state.started = time.time()
    return app


def api_key_from(value: str | None) -> str | None:
    """--api-key, or $TPI_API_KEY; a value starting with @ names a file holding it."""
    key = value or os.environ.get("TPI_API_KEY")
    if key and key.startswith("@"):
        with open(key[1:]) as f:
            key = f.read().strip()
    return key or None
