"""``POST /v1/chat/completions``: one generation on the model worker, answered whole or streamed as server-sent
events."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from kvstash.compress.pipeline import Compression
from kvstash.engine import GenerationResult
from kvstash.prompt import PromptPlan
from kvstash.reuse import ReuseMethod
from kvstash.server import chat
from kvstash.server.documents import Document
from kvstash.server.errors import job_error
from kvstash.server.requestlog import log_fields
from kvstash.server.routes_documents import named_documents
from kvstash.server.schemas import ApiError, ChatRequest
from kvstash.server.state import ClientGone, ServerState, next_event, submit
from kvstash.server.tokenview import token_view
from kvstash.server.worker import Job, ShuttingDown

Extension = Callable[[GenerationResult, bool], Awaitable[dict]]  # (result, streamed) -> the ``kvstash`` field


@dataclass
class _Planned:
    plan: PromptPlan | None = None  # set on the worker once the prompt is planned


def _generation(st: ServerState, segments, params, method: ReuseMethod) -> tuple[Job, _Planned]:
    """Queue one generation on the model worker; its deltas and result come back as the job's events. The
    prompt is planned (tokenized) once, on the worker, and the scheduler runs it in the batch."""
    planned = _Planned()

    def plan():
        plan = st.engine.plan(segments)
        try:
            st.engine.check_length(plan)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        planned.plan = plan
        return plan

    return submit(st, lambda: st.worker.generate(plan, params, method, Compression(), st.speculate)), planned


def _extension(st: ServerState, body: ChatRequest, planned: _Planned, docs: list[Document]) -> Extension:
    """How the response's ``kvstash`` field is made once the result is in: the token view is built (off the
    event loop) only when the request asked for it."""
    names = [(doc.id, k) for doc in docs for k in range(len(doc.chunks))]

    async def make(result: GenerationResult, streamed: bool) -> dict:
        view = None
        if body.token_view and planned.plan is not None:
            view = await asyncio.to_thread(token_view, st.engine.tokenizer, planned.plan, result.prefill, names)
        return chat.extension(result, view, streamed)

    return make


def add_chat_routes(app: FastAPI, st: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        t0 = time.perf_counter()
        model = st.check_model(body.model)
        params = chat.sampling_params(body, st.engine.lm.context_limit)
        method = chat.reuse_method(body.reuse, st.method, st.engine.config.prefill_chunk)
        docs = await named_documents(st, body.documents)
        segments = chat.build_segments(body.messages, docs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        log_fields(request, request_id=rid, documents=len(docs), stream=bool(body.stream), reuse=method.name)
        job, planned = _generation(st, segments, params, method)
        ext = _extension(st, body, planned, docs)
        try:
            first = await next_event(job, request)
            if body.stream:
                if first[0] == "error":
                    raise job_error(first[1])
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                out = chat.ChunkWriter(rid, created, model)
                stream = _stream(st, job, first, out, include_usage, t0, request, ext)
                return StreamingResponse(stream, media_type="text/event-stream", background=BackgroundTask(job.cancel))
            event = first
            while event[0] == "delta":
                event = await next_event(job, request)
        except ClientGone:
            return Response(status_code=499)
        if event[0] == "error" or event[1] is None:
            raise job_error(event[1] if event[0] == "error" else ShuttingDown("the server is shutting down"))
        _finished(st, request, job, event[1], t0)
        return chat.completion(rid, created, model, event[1], await ext(event[1], False))


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


async def _stream(
    st, job: Job, first, out: chat.ChunkWriter, include_usage: bool, t0: float, request: Request, ext: Extension
):
    """The SSE body; the chunk with the finish reason carries the ``kvstash`` field. If the client goes away the
    body is cancelled here and the job is cancelled with it."""
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
            yield out.finish(value.finish_reason, await ext(value, True))
            if include_usage:
                yield out.usage(value)
            yield chat.DONE
        finished = True
    finally:
        if not finished:
            job.cancel()
            log_fields(request, cancelled=True)


# --- documents and operations -----------------------------------------------------------------------
