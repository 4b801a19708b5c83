"""The OpenAI-compatible HTTP server: FastAPI routes over one engine, whose model worker batches requests.

Routes: ``POST /v1/chat/completions`` (streamed or not; extension field ``documents``), ``GET /v1/models``,
``POST /v1/documents``, ``GET``/``DELETE /v1/documents/{id}``, ``GET /health``, ``GET /metrics``.
Every error is answered as OpenAI-style JSON (``{"error": {...}}``) with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from kvstash.batch.scheduler import BatchConfig, Scheduler
from kvstash.compress.pipeline import Compression
from kvstash.engine import Engine
from kvstash.reuse import ReuseMethod, make_method
from kvstash.server import chat
from kvstash.server.documents import (
    Document,
    DocumentRegistry,
    compute_document,
    open_registry,
    valid_id,
)
from kvstash.server.errors import add_error_handlers, job_error
from kvstash.server.metrics import CONTENT_TYPE, Metrics
from kvstash.server.requestlog import RequestLog, log_fields
from kvstash.server.schemas import (
    ApiError,
    ChatRequest,
    DocumentDeleted,
    DocumentInfo,
    DocumentRequest,
    ModelCard,
    ModelList,
)
from kvstash.server.worker import Job, QueueFull, ShuttingDown, Worker

log = logging.getLogger("kvstash.server")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    reuse: str = "blend"  # reuse method for chat requests: full | prefix | naive | blend | blend:RATIO
    max_queue: int = 64  # requests waiting for the model before new ones get 503
    max_batch: int = 16  # sequences decoding together (1: one at a time)
    max_batch_tokens: int = 512  # rows per batched step: decode tokens plus prompt chunks
    kv_budget: int | None = None  # bytes of KV all requests in the batch may hold (None: a quarter of the RAM)
    chunk_tokens: int = 256  # about how many tokens one document chunk holds
    shutdown_timeout_s: int = 10  # on SIGTERM, how long the running generation may take to finish

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.shutdown_timeout_s < 1:
            raise ValueError(f"shutdown_timeout_s must be >= 1, got {self.shutdown_timeout_s}")
        if self.chunk_tokens < 16:
            raise ValueError(f"chunk_tokens must be >= 16, got {self.chunk_tokens}")
        make_method(self.reuse)  # ValueError naming the known methods, before the model loads
        self.batch  # noqa: B018 - ValueError for a bad batch size, token budget or KV budget

    @property
    def batch(self) -> BatchConfig:
        return BatchConfig(self.max_batch, self.max_batch_tokens, self.kv_budget)


@dataclass
class ServerState:
    """What the routes share: the engine behind its worker, the registry, the metrics."""

    engine: Engine
    config: ServerConfig
    method: ReuseMethod  # built once from config.reuse
    registry: DocumentRegistry
    worker: Worker
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, set at startup
    closed: bool = False

    @property
    def model(self) -> str:
        return self.engine.lm.name

    def check_model(self, requested: str | None) -> str:
        if requested in (None, self.model, self.engine.config.model):
            return self.model
        raise ApiError(404, f"model {requested!r} is not served here; use {self.model!r}", code="model_not_found")

    def begin_shutdown(self) -> None:
        """On SIGTERM (from the signal handler): queued requests get 503 now; the running generation may
        finish, and is cancelled (its client gets an error event) shortly before uvicorn's grace period
        ends, so every response ends cleanly."""
        if self.loop is None or self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.worker.drain)
        grace = max(0.0, self.config.shutdown_timeout_s - 2.0)
        self.loop.call_soon_threadsafe(self.loop.call_later, grace, self.worker.cancel_running)

    def close(self) -> None:
        """Stop the worker, then close the registry and the chunk store. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.worker.stop()
        self.registry.close()
        self.engine.close()
        log.info(json.dumps({"event": "stopped"}))


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app over ``engine``. Opens the chunk store and the document registry now; the worker
    starts and everything closes with the app's lifespan. ValueError on a bad reuse method or store spec."""
    config = config or ServerConfig()
    method = engine.method(config.reuse)
    registry = open_registry(engine.config.store)
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
        log.info(json.dumps(started))
        try:
            yield
        finally:
            await asyncio.to_thread(st.close)

    app = FastAPI(title="kvstash", lifespan=lifespan)
    app.state.kvstash = st
    app.add_middleware(RequestLog, metrics=st.metrics)
    add_error_handlers(app)
    _add_chat_routes(app, st)
    _add_document_routes(app, st)
    _add_ops_routes(app, st)
    return app


class ClientGone(Exception):
    """The client disconnected while its request waited for the model."""


def _submit(st: ServerState, fn) -> Job:
    """``fn()`` queued on the model worker (``worker.submit`` or ``worker.generate``); 503 when it cannot be."""
    try:
        return fn()
    except QueueFull as e:
        raise ApiError(503, f"{e}; retry later", code="overloaded") from None
    except ShuttingDown as e:
        raise ApiError(503, str(e), code="unavailable") from None


async def _next_event(job: Job, request: Request) -> tuple[str, Any]:
    """The job's next event. If the client disconnects meanwhile, cancel the job and raise ClientGone."""
    task = asyncio.ensure_future(job.next_event())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone
    finally:
        task.cancel()


# --- chat -------------------------------------------------------------------------------------------


def _generation(st: ServerState, segments, params) -> Job:
    """Queue one generation on the model worker; its deltas and result come back as the job's events. The
    prompt is planned (tokenized) once, on the worker, and the scheduler runs it in the batch."""

    def plan():
        plan = st.engine.plan(segments)
        try:
            st.engine.check_length(plan)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        return plan

    return _submit(st, lambda: st.worker.generate(plan, params, st.method, Compression()))


async def _documents(st: ServerState, ids: list[str]) -> list[Document]:
    docs = []
    for i, doc_id in enumerate(ids):
        doc = await asyncio.to_thread(st.registry.get, doc_id) if valid_id(doc_id) else None
        if doc is None:
            raise ApiError(
                404,
                f"document {doc_id!r} not found; register it with POST /v1/documents",
                param=f"documents.{i}",
                code="document_not_found",
            )
        docs.append(doc)
    return docs


def _add_chat_routes(app: FastAPI, st: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        t0 = time.perf_counter()
        model = st.check_model(body.model)
        params = chat.sampling_params(body, st.engine.lm.context_limit)
        docs = await _documents(st, body.documents)
        segments = chat.build_segments(body.messages, docs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        log_fields(request, request_id=rid, documents=len(docs), stream=bool(body.stream))
        job = _generation(st, segments, params)
        try:
            first = await _next_event(job, request)
            if body.stream:
                if first[0] == "error":
                    raise job_error(first[1])
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                stream = _stream(st, job, first, chat.ChunkWriter(rid, created, model), include_usage, t0, request)
                return StreamingResponse(stream, media_type="text/event-stream", background=BackgroundTask(job.cancel))
            event = first
            while event[0] == "delta":
                event = await _next_event(job, request)
        except ClientGone:
            return Response(status_code=499)
        if event[0] == "error" or event[1] is None:
            raise job_error(event[1] if event[0] == "error" else ShuttingDown("the server is shutting down"))
        _finished(st, request, job, event[1], t0)
        return chat.completion(rid, created, model, event[1])


def _finished(st: ServerState, request: Request, job: Job, result, t0: float) -> None:
    """Metrics and log fields of a completed generation."""
    ttft = (job.first_token_at or time.perf_counter()) - t0
    st.metrics.generation(result, ttft)
    log_fields(
        request,
        queue_s=round((job.started_at or t0) - job.enqueued_at, 4),
        ttft_s=round(ttft, 4),
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        cached_tokens=result.prefill.reused_tokens,
        recomputed_tokens=result.prefill.recomputed_tokens,
        finish_reason=result.finish_reason,
    )


async def _stream(st, job: Job, first, out: chat.ChunkWriter, include_usage: bool, t0: float, request: Request):
    """The SSE body. If the client goes away the body is cancelled here and the job is cancelled with it."""
    finished = False
    try:
        yield out.role()
        kind, value = first
        while kind == "delta":
            yield out.delta(value)
            kind, value = await job.next_event()
        if kind == "error" or value is None:
            err = job_error(value if kind == "error" else ShuttingDown("the server is shutting down"))
            log_fields(request, error=err.message)
            yield chat.event(err.body())
        else:
            _finished(st, request, job, value, t0)
            yield out.finish(value.finish_reason)
            if include_usage:
                yield out.usage(value)
            yield chat.DONE
        finished = True
    finally:
        if not finished:
            job.cancel()
            log_fields(request, cancelled=True)


# --- documents and operations -----------------------------------------------------------------------


def _info(doc: Document) -> DocumentInfo:
    return DocumentInfo(id=doc.id, chunks=len(doc.chunks), tokens=doc.tokens, created=doc.created)


def _not_found(doc_id: str) -> ApiError:
    return ApiError(404, f"document {doc_id!r} not found", param="id", code="document_not_found")


def _add_document_routes(app: FastAPI, st: ServerState) -> None:
    @app.post("/v1/documents")
    async def create_document(body: DocumentRequest, request: Request) -> DocumentInfo:
        if not body.text.strip():
            raise ApiError(400, "text is empty; send the document's text", param="text")
        text, size = body.text, st.config.chunk_tokens
        job = _submit(st, lambda: st.worker.submit(lambda job: compute_document(st.engine, text, size)))
        try:
            kind, value = await _next_event(job, request)
        except ClientGone:
            return Response(status_code=499)
        if kind == "error":
            raise job_error(value)
        await asyncio.to_thread(st.registry.put, value)
        log_fields(request, document=value.id, chunks=len(value.chunks), tokens=value.tokens)
        return _info(value)

    @app.get("/v1/documents/{doc_id}")
    async def get_document(doc_id: str) -> DocumentInfo:
        doc = await asyncio.to_thread(st.registry.get, doc_id) if valid_id(doc_id) else None
        if doc is None:
            raise _not_found(doc_id)
        return _info(doc)

    @app.delete("/v1/documents/{doc_id}")
    async def delete_document(doc_id: str) -> DocumentDeleted:
        if not (valid_id(doc_id) and await asyncio.to_thread(st.registry.delete, doc_id)):
            raise _not_found(doc_id)
        return DocumentDeleted(id=doc_id)


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
    """uvicorn's server, also telling kvstash when a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        self._on_exit()


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
