"""Every failure as OpenAI's error JSON: bad input 400, bad key 401, queue
full 429, cluster down 503, anything else 500 (never a traceback)."""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tpi.comm.links import ClusterError
from tpi.errors import PromptError, TpiError
from tpi.master.kv_budget import KVBudgetError
from tpi.master.serve.model_holder import ModelDown
from tpi.master.serve.protocol import error_body


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

    def body(self) -> dict:
        return error_body(str(self), self.type, self.code, self.param)


def cluster_down(e: BaseException) -> ApiError:
    return ApiError(503, f"the cluster is down: {e}", "server_error", "cluster_down")


def generation_error(e: BaseException) -> ApiError:
    """What a failed generation means for the client."""
    if isinstance(e, ClusterError | ModelDown):
        return cluster_down(e)
    if isinstance(e, KVBudgetError):
        return ApiError(400, str(e), code="kv_budget_exceeded", param="max_tokens")
    if isinstance(e, PromptError):
        return ApiError(400, str(e), code="context_length_exceeded")
    if isinstance(e, TpiError):
        return ApiError(500, str(e), "server_error")
    return ApiError(500, f"internal error: {type(e).__name__}", "server_error")


# Validation error locations name the union member or validator tried ("str",
# "function-after[_unicode(), str]"): not something a client can act on.
_NOT_A_FIELD = re.compile(r"body|(function-\w+|list|dict)\[.*\]|str|int|float|bool")


def _is_field(part: object) -> bool:
    return isinstance(part, int) or not _NOT_A_FIELD.fullmatch(str(part))


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if _is_field(x))
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
