"""The routes: /v1/chat/completions, /v1/completions, /v1/models, /health,
/metrics and the chat page. Each reads the server's state from `request.app.state.tpi`."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field, replace
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from tpi.errors import TpiError
from tpi.master.sampling import SamplingParams
from tpi.master.serve.errors import ApiError, cluster_down
from tpi.master.serve.jobs import GenerationQueue, Job, QueueFull
from tpi.master.serve.limits import check_prompt_chars
from tpi.master.serve.model_holder import ModelHolder
from tpi.master.serve.protocol import ChatRequest, CompletionRequest, SamplingFields, now
from tpi.master.serve.responses import CHAT, TEXT, Answer, Endpoint
from tpi.planning.report import plan_summary
from tpi.text.prompts import conversation_ids

DEFAULT_MAX_TOKENS = 512

router = APIRouter()


@dataclass
class ServerState:
    holder: ModelHolder  # the LoadedModel, reconnected after a failure
    model_name: str
    defaults: SamplingParams  # the command line's sampling
    generation: GenerationQueue
    created: int = field(default_factory=now)

    @property
    def tokenizer(self):
        return self.holder.loaded.tokenizer

    def sampling(self, req: SamplingFields) -> SamplingParams:
        d = self.defaults
        return SamplingParams(
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_k=d.top_k if req.top_k is None else req.top_k,
            top_p=d.top_p if req.top_p is None else req.top_p,
            seed=req.seed,
            max_new_tokens=req.max_completion_tokens
            or req.max_tokens
            or d.max_new_tokens
            or DEFAULT_MAX_TOKENS,
        )


def _state(request: Request) -> ServerState:
    return request.app.state.tpi


def _check_fits(state: ServerState, ids: list[int], param: str) -> None:
    limit = state.holder.loaded.engine.max_positions
    if not ids:
        raise ApiError(400, "the prompt is empty", param=param)
    if len(ids) >= limit:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens; the context window is {limit}",
            code="context_length_exceeded",
        )


async def _submit(state: ServerState, ids: list[int], req: SamplingFields) -> list[Job]:
    """Queue the request's n choices: one job each, generated in the same batch (with
    a seed, choice i samples with seed + i, so choices differ and are reproducible)."""
    if state.holder.error is not None and not state.holder.may_retry():
        raise cluster_down(state.holder.error)
    try:
        stops = req.stops()
    except ValueError as e:
        raise ApiError(400, str(e), param="stop") from None
    params = state.sampling(req)
    loop, events, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    jobs = [
        Job(
            ids,
            params if params.seed is None else replace(params, seed=(params.seed + i) % 2**64),
            stops,
            loop,
            events,
            cancel,
            index=i,
        )
        for i in range(req.n)
    ]
    try:
        state.generation.submit(*jobs)
    except QueueFull:
        raise ApiError(
            429, "too many requests waiting; try again shortly", "rate_limit_error", "queue_full"
        ) from None
    return jobs


async def _respond(ids: list[int], req: SamplingFields, request: Request, endpoint: Endpoint):
    """Queue one generation (n choices) and answer it in `endpoint`'s shape, streamed
    or whole."""
    state = _state(request)
    _check_fits(state, ids, "messages" if endpoint is CHAT else "prompt")
    answer = Answer(await _submit(state, ids, req), endpoint, state.model_name)
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        response = await answer.stream(request, include)
    else:
        response = await answer.whole(request)
    return response if response is not None else Response(status_code=499)  # client gone


async def _tokenize(state: ServerState, chars: int, encode, param: str) -> list[int]:
    """Token ids, computed off the event loop, after a length check that needs none."""
    tok = state.tokenizer
    check_prompt_chars(chars, state.holder.loaded.engine.max_positions, tok.max_token_chars)
    try:
        return await asyncio.to_thread(encode)
    except UnicodeEncodeError:
        raise ApiError(
            400, "the text is not valid Unicode (a lone surrogate?)", param=param
        ) from None
    except TpiError as e:
        raise ApiError(400, str(e), param=param) from None


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    state = _state(request)
    messages = [
        {"role": m.role if m.role != "developer" else "system", "content": m.content}
        for m in req.messages
    ]
    chars = sum(len(m["content"]) for m in messages)
    ids = await _tokenize(
        state, chars, lambda: conversation_ids(state.tokenizer, messages), "messages"
    )
    return await _respond(ids, req, request, CHAT)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = _state(request)
    if isinstance(req.prompt, list) and len(req.prompt) != 1:
        raise ApiError(400, "prompt lists must hold exactly one prompt", param="prompt")
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    ids = await _tokenize(state, len(prompt), lambda: state.tokenizer.encode(prompt), "prompt")
    return await _respond(ids, req, request, TEXT)


@router.get("/v1/models")
async def models(request: Request):
    state = _state(request)
    return {
        "object": "list",
        "data": [
            {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "tpi"}
        ],
    }


@router.get("/health")
async def health(request: Request):
    state = _state(request)
    holder, gen = state.holder, state.generation
    ranks = [{"rank": 0, "address": "local", "state": "ok"}]
    cluster = holder.loaded.cluster
    if cluster is not None:
        for link in cluster.links.links:
            link_state = "lost" if link.lost else ("ok" if link.connected else "connecting")
            ranks.append({"rank": link.rank, "address": link.name, "state": link_state})
    down = holder.error is not None or any(r["state"] == "lost" for r in ranks)
    body = {
        "status": "down" if down else "ok",
        "model": state.model_name,
        "ranks": ranks,
        "busy": gen.busy,
        "running": gen.running,
        "max_batch": gen.settings.max_batch,
        "waiting": gen.waiting,
        "recent": list(gen.recent),
    }
    if holder.elastic is not None:
        body["world"] = holder.elastic.world
        body["recoveries"] = [r.to_dict() for r in holder.elastic.recoveries[-5:]]
    plan = getattr(holder.loaded, "plan", None)
    if plan is not None:  # what --plan auto chose, and why
        body["plan"] = plan_summary(plan)
    if holder.error is not None:
        body["error"] = holder.error
    return JSONResponse(body, status_code=503 if down else 200)


@router.get("/cluster")
async def cluster_view(request: Request):
    """The chat page's cluster view: every node's share, window, memory, link round
    trip, and a live breakdown of its time per forward pass (master/serve/cluster_view.py)."""
    return request.app.state.cluster_view.view()


@router.get("/metrics")
async def metrics(request: Request):
    """Prometheus' text format: queue, batch, tokens, TTFT and inter-token
    histograms, KV memory, allreduce totals, failures and recoveries."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = _state(request).generation.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse)
async def page():
    return resources.files("tpi.master").joinpath("static/chat.html").read_text()
