"""Every error as OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``) with its status:
the caller's mistakes are 4xx, a busy or stopping server 503, anything else 500 (logged; the server runs on).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvstash.server.documents import RegistryUnavailable
from kvstash.server.schemas import ApiError
from kvstash.server.worker import Cancelled, ShuttingDown

log = logging.getLogger("kvstash.server")


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": "invalid"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            err = ApiError(400, f"the body is not valid JSON ({detail})", code="json_invalid")
        else:
            where = ".".join(loc) or "body"
            err = ApiError(400, f"{where}: {first.get('msg')}", param=".".join(loc) or None, code=first.get("type"))
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RegistryUnavailable)
    async def registry_down(request: Request, exc: RegistryUnavailable) -> JSONResponse:
        log.warning("%s", exc)
        return _error_response(ApiError(503, str(exc), code="registry_unavailable"))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error"))


def job_error(exc: BaseException) -> ApiError:
    """The API error for an exception a job raised on the worker."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValueError | TypeError):
        return ApiError(400, str(exc))
    if isinstance(exc, ShuttingDown | Cancelled):
        return ApiError(503, str(exc), code="unavailable")
    if isinstance(exc, RegistryUnavailable):
        return ApiError(503, str(exc), code="registry_unavailable")
    log.error("model worker job failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
