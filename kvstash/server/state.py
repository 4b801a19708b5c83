"""What the routes share: the server's settings, its state (engine, worker, registry, metrics), and the
helpers that queue work on the model worker and wait for its events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from kvstash.batch.scheduler import BatchConfig
from kvstash.engine import Engine
from kvstash.reuse import ReuseMethod, make_method
from kvstash.server.documents import DocumentRegistry
from kvstash.server.metrics import Metrics
from kvstash.server.schemas import (
    ApiError,
)
from kvstash.server.worker import Job, QueueFull, ShuttingDown, Worker
from kvstash.speculate.speculation import SpecConfig

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
    swap: bool = True  # a preempted request's KV to a file and back (else dropped and recomputed)
    swap_dir: str | None = None  # where swapped KV goes (None: a private temporary directory)
    speculate: str = "off"  # speculative decoding of answers: off | ngram
    chunk_tokens: int = 256  # about how many tokens one document chunk holds
    shutdown_timeout_s: int = 10  # on SIGTERM, how long the running generation may take to finish
    api_key: str | None = field(default=None, repr=False)  # None: open; else Bearer KEY on /v1/*, /tokenize, ...
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed by CORS ("*": any); none: no CORS headers
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413
    registry_sync_s: float = 10.0  # how often to copy other servers' documents from Redis (0: never)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.shutdown_timeout_s < 1:
            raise ValueError(f"shutdown_timeout_s must be >= 1, got {self.shutdown_timeout_s}")
        if self.chunk_tokens < 16:
            raise ValueError(f"chunk_tokens must be >= 16, got {self.chunk_tokens}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if not self.registry_sync_s >= 0:
            raise ValueError(f"registry_sync_s must be >= 0 seconds (0: off), got {self.registry_sync_s}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; pass a non-empty key, or none to leave the API open")
        object.__setattr__(self, "allowed_origins", tuple(o.strip() for o in self.allowed_origins if o.strip()))
        make_method(self.reuse)  # ValueError naming the known methods, before the model loads
        self.batch  # noqa: B018 - ValueError for a bad batch size, token budget or KV budget
        SpecConfig.parse(self.speculate)  # ValueError naming the choices

    @property
    def batch(self) -> BatchConfig:
        return BatchConfig(self.max_batch, self.max_batch_tokens, self.kv_budget, self.swap, self.swap_dir)


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
    def speculate(self) -> SpecConfig | None:
        return SpecConfig.parse(self.config.speculate)

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


class ClientGone(Exception):
    """The client disconnected while its request waited for the model."""


def submit(st: ServerState, fn) -> Job:
    """``fn()`` queued on the model worker (``worker.submit`` or ``worker.generate``); 503 when it cannot be."""
    try:
        return fn()
    except QueueFull as e:
        raise ApiError(503, f"{e}; retry later", code="overloaded") from None
    except ShuttingDown as e:
        raise ApiError(503, str(e), code="unavailable") from None


async def next_event(job: Job, request: Request) -> tuple[str, Any]:
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
