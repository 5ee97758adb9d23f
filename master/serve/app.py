"""The app factory: one model (or cluster) behind the OpenAI-compatible routes."""

from __future__ import annotations

import contextlib
import os
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tpi.comm.links import ClusterError
from tpi.master.sampling import SamplingParams
from tpi.master.serve.endpoints import ServerState, router
from tpi.master.serve.errors import install_handlers
from tpi.master.serve.jobs import GenerationQueue
from tpi.master.serve.model_holder import ModelHolder
from tpi.master.serve.protocol import error_body

OPEN_PATHS = ("/health", "/", "/favicon.ico")  # no API key needed


def create_app(
    holder: ModelHolder,
    model_name: str,
    defaults: SamplingParams,
    api_key: str | None = None,
    capacity: int = 8,
) -> FastAPI:
    """`holder` holds the LoadedModel (and reconnects it after a failure);
    `defaults` is the command line's sampling; `capacity` bounds running + waiting."""
    loaded = holder.loaded

    def on_error(e: BaseException) -> None:
        if isinstance(e, ClusterError):
            holder.failed(e)

    gen = GenerationQueue(loaded.engine, loaded.tokenizer, capacity, on_error)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        gen.close()

    app = FastAPI(title="tpi", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.tpi = ServerState(holder, model_name, defaults, gen)
    app.state.generation = gen
    install_handlers(app)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path not in OPEN_PATHS:
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

    app.include_router(router)
    return app


def api_key_from(value: str | None) -> str | None:
    """--api-key, or $TPI_API_KEY; a value starting with @ names a file holding it."""
    key = value or os.environ.get("TPI_API_KEY")
    if key and key.startswith("@"):
        with open(key[1:]) as f:
            key = f.read().strip()
    return key or None
