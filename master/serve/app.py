"""The app factory: one model (or cluster) behind the OpenAI-compatible routes."""

from __future__ import annotations

import contextlib

from fastapi import FastAPI

from tpi.master.sampling import SamplingParams
from tpi.master.serve.api_key import ApiKeyCheck
from tpi.master.serve.cluster_view import ClusterMonitor
from tpi.master.serve.endpoints import ServerState, router
from tpi.master.serve.errors import install_handlers
from tpi.master.serve.jobs import BatchSettings, GenerationQueue
from tpi.master.serve.limits import DEFAULT_MAX_REQUEST_BYTES, BodyLimit
from tpi.master.serve.model_holder import ModelHolder


def create_app(
    holder: ModelHolder,
    model_name: str,
    defaults: SamplingParams,
    api_key: str | None = None,
    capacity: int = 8,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    batching: BatchSettings | None = None,
) -> FastAPI:
    """`holder` holds the LoadedModel (and reconnects it after a failure);
    `defaults` is the command line's sampling; `capacity` bounds running + waiting;
    `batching` how many run together."""
    gen = GenerationQueue(holder, capacity, batching)
    monitor = ClusterMonitor(holder)
    gen.between_passes.append(monitor.maybe_sample)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        gen.close()

    app = FastAPI(title="tpi", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.tpi = ServerState(holder, model_name, defaults, gen)
    app.state.generation = gen
    app.state.cluster_view = monitor
    install_handlers(app)

    app.include_router(router)
    if api_key:
        app.add_middleware(ApiKeyCheck, api_key=api_key)
    app.add_middleware(BodyLimit, limit=max_request_bytes)  # outermost: before anything reads
    return app
