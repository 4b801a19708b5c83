"""What guards the API: the API key (``Authorization: Bearer KEY`` on ``/v1/*``, ``/tokenize`` and
``/detokenize``), a limit on request bodies, and CORS for the origins allowed to call from a browser.

The key and body checks are ASGI middleware, so they answer (401, 413, with OpenAI-style error bodies) before a
route parses anything. ``/health``, ``/metrics``, the playground page and its ``/static/`` files stay open.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware

from kvstash.server.schemas import ApiError

PROTECTED = ("/v1/", "/tokenize", "/detokenize")  # path prefixes that need the key


def add_security(app: FastAPI, api_key: str | None, allowed_origins: tuple[str, ...], max_body_bytes: int) -> None:
    """Install the guards (innermost first: key, body limit, CORS, so a 401 or 413 carries CORS headers too)."""
    if api_key:
        app.add_middleware(ApiKeyAuth, api_key=api_key)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if allowed_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"], allow_headers=["*"]
        )


def needs_key(path: str) -> bool:
    return path == "/v1" or path.startswith(PROTECTED)


async def _refuse(err: ApiError, scope, receive, send, headers: dict[str, str] | None = None) -> None:
    await JSONResponse(err.body(), status_code=err.status, headers=headers)(scope, receive, send)


class ApiKeyAuth:
    """401 for a protected path whose ``Authorization`` header is not ``Bearer <the key>``."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not needs_key(scope["path"]):
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
            await self.app(scope, receive, send)
            return
        message = (
            "invalid API key; send the key the server was started with (--api-key) as 'Authorization: Bearer KEY'"
            if auth
            else "missing API key; send it as 'Authorization: Bearer KEY' (the key the server was started with)"
        )
        err = ApiError(401, message, code="invalid_api_key")
        await _refuse(err, scope, receive, send, {"WWW-Authenticate": "Bearer"})


class BodyLimit:
    """413 for a request body over ``max_bytes``: at once by its Content-Length, or, for a chunked body, as soon
    as the bytes read pass the limit. The body is read whole here (routes read it whole anyway), then replayed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"the request body is larger than this server's limit of {self.max_bytes} bytes (--max-body-bytes); "
            "send less text at once, e.g. register long documents one by one",
            code="request_too_large",
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _refuse(self._too_large(), scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await _refuse(self._too_large(), scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[dict], receive):
    """A ``receive`` that returns ``messages`` first, then reads on from the client."""
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed
