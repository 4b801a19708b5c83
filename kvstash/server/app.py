"""The OpenAI-compatible HTTP server: FastAPI routes over one engine, whose model worker batches requests.

Routes: ``POST /v1/chat/completions`` (streamed or not; ``logprobs``; extension fields ``documents``, ``reuse``,
``token_view``), ``POST /v1/completions``, ``GET /v1/models``, ``POST /v1/documents``, ``GET``/``DELETE
/v1/documents/{id}``, ``POST /tokenize``, ``POST /detokenize``, ``GET /health``, ``GET /metrics``, and the browser
playground at ``GET /``. With an API key, ``/v1/*``, ``/tokenize`` and ``/detokenize`` need it
(:mod:`kvstash.server.security`). Every error is answered as OpenAI-style JSON (``{"error": {...}}``) with a
4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from kvstash.batch.scheduler import Scheduler
from kvstash.engine import Engine
from kvstash.server.documents import FallbackRegistry, open_registry
from kvstash.server.errors import add_error_handlers
from kvstash.server.metrics import CONTENT_TYPE, Metrics
from kvstash.server.requestlog import RequestLog
from kvstash.server.routes_chat import add_chat_routes
from kvstash.server.routes_completions import add_completion_routes
from kvstash.server.routes_documents import add_document_routes
from kvstash.server.routes_playground import add_playground_routes, browser_url
from kvstash.server.routes_tokens import add_token_routes
from kvstash.server.schemas import (
    ModelCard,
    ModelList,
)
from kvstash.server.security import add_security
from kvstash.server.state import ServerConfig, ServerState
from kvstash.server.worker import Worker

log = logging.getLogger("kvstash.server")


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app over ``engine``. Opens the chunk store and the document registry now; the worker
    starts and everything closes with the app's lifespan. ValueError on a bad reuse method or store spec."""
    config = config or ServerConfig()
    method = engine.method(config.reuse)
    registry = open_registry(engine.config.store)
    if config.registry_sync_s > 0 and isinstance(registry, FallbackRegistry):
        registry.start_mirror(config.registry_sync_s)
    engine.chunks  # noqa: B018 - open the store here, not lazily on the worker and the metrics thread at once
    metrics = Metrics()
    worker = Worker(Scheduler(engine, config.batch), config.max_queue, metrics.step, metrics.sequence_done)
    st = ServerState(engine, config, method, registry, worker, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st.loop = asyncio.get_running_loop()
        st.worker.start()
        started = {"event": "started", "model": st.model, "store": engine.config.store, "reuse": method.name}
        started |= {"registry": registry.kind, "dtype": engine.config.dtype, "max_batch": config.max_batch}
        started |= {"kv_budget": st.worker.scheduler.kv_budget, "url": f"http://{config.host}:{config.port}/v1"}
        started["playground"] = browser_url(config.host, config.port)
        started |= {"auth": config.api_key is not None, "allowed_origins": list(config.allowed_origins)}
        log.info(json.dumps(started))
        try:
            yield
        finally:
            await asyncio.to_thread(st.close)

    app = FastAPI(title="kvstash", lifespan=lifespan)
    app.state.kvstash = st
    add_security(app, config.api_key, config.allowed_origins, config.max_body_bytes)
    app.add_middleware(RequestLog, metrics=st.metrics)  # outermost: refused requests are logged and counted too
    add_error_handlers(app)
    add_chat_routes(app, st)
    add_completion_routes(app, st)
    add_token_routes(app, st)
    add_document_routes(app, st)
    _add_ops_routes(app, st)
    add_playground_routes(app)
    return app


def _add_ops_routes(app: FastAPI, st: ServerState) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": st.model,
            "dtype": st.engine.config.dtype,
            "queued": st.worker.queued,
            "running": st.worker.running,
        }

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        tiers = await asyncio.to_thread(st.engine.store_stats)
        text = st.metrics.render(tiers, st.worker.queued, st.worker.running)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=st.model, created=st.created)])

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> ModelCard:
        return ModelCard(id=st.check_model(model_id), created=st.created)


# --- running ------------------------------------------------------------------------------------------


def serve(engine: Engine, config: ServerConfig) -> int:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully (see
    :meth:`ServerState.begin_shutdown`): the worker stops and the store closes. Returns the exit status."""
    app = create_app(engine, config)
    server = _Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_config=None,  # keep kvstash's logging set-up
            log_level="warning",
            access_log=False,  # RequestLog writes one structured line per request instead
            timeout_graceful_shutdown=config.shutdown_timeout_s,
        ),
        on_exit=app.state.kvstash.begin_shutdown,
        on_started=lambda: print(f"kvstash: playground at {browser_url(config.host, config.port)}", flush=True),
    )
    # uvicorn re-raises the signal it shut down for once it is done; exit cleanly instead of dying by it
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    try:
        server.run()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, also telling kvstash when it listens and when a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit, on_started) -> None:
        super().__init__(config)
        self._on_exit, self._on_started = on_exit, on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:  # listening (a port in use ends the server instead)
            self._on_started()

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        self._on_exit()


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
