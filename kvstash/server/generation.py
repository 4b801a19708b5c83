"""One generation on the model worker, answered whole or streamed as server-sent events; shared by
``/v1/chat/completions`` and ``/v1/completions``, which differ only in how the prompt is planned and how the
answer is written (a :class:`Writer`)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from kvstash.compress.pipeline import Compression
from kvstash.decoding import TextDelta, TokenLogprob
from kvstash.engine import GenerationResult
from kvstash.prompt import PromptPlan
from kvstash.reuse import ReuseMethod
from kvstash.sampling import SamplingParams
from kvstash.server.errors import job_error
from kvstash.server.requestlog import log_fields
from kvstash.server.schemas import ApiError
from kvstash.server.state import ClientGone, ServerState, next_event, submit
from kvstash.server.worker import Job, ShuttingDown

Extension = Callable[[GenerationResult, bool], Awaitable[dict]]  # (result, streamed) -> the ``kvstash`` field
Whole = Callable[[GenerationResult, dict], BaseModel]  # (result, kvstash field) -> the non-streamed body

DONE = "data: [DONE]\n\n"


class Writer(Protocol):
    """The server-sent events of one streamed answer."""

    def opening(self) -> str | None: ...  # the event before any text (chat: the assistant's role), or None

    def delta(self, delta: TextDelta) -> str: ...

    def finish(self, result: GenerationResult, logprobs: list[TokenLogprob] | None, ext: dict) -> str: ...

    def usage(self, result: GenerationResult) -> str: ...


@dataclass
class Planned:
    plan: PromptPlan | None = None  # set on the worker once the prompt is planned


def start(
    st: ServerState, prepare: Callable[[], PromptPlan], params: SamplingParams, method: ReuseMethod, param: str
) -> tuple[Job, Planned]:
    """Queue one generation on the model worker; its deltas and result come back as the job's events. The
    prompt is planned (tokenized) once, on the worker, by ``prepare``; a prompt over the model's context is a 400
    naming ``param``. The scheduler runs it in the batch."""
    planned = Planned()

    def plan() -> PromptPlan:
        plan = prepare()
        try:
            st.engine.check_length(plan)
        except ValueError as e:
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
        planned.plan = plan
        return plan

    return submit(st, lambda: st.worker.generate(plan, params, method, Compression(), st.speculate)), planned


@dataclass
class Answer:
    """How a route answers its job: streamed through ``writer`` or whole through ``whole``."""

    stream: bool
    include_usage: bool
    writer: Writer
    whole: Whole
    ext: Extension


async def respond(st: ServerState, request: Request, job: Job, answer: Answer, t0: float):
    """Wait for the job and answer: a StreamingResponse of server-sent events, or the whole body."""
    try:
        first = await next_event(job, request)
        if answer.stream:
            if first[0] == "error":
                raise job_error(first[1])
            body = _stream(st, job, first, answer, t0, request)
            return StreamingResponse(body, media_type="text/event-stream", background=BackgroundTask(job.cancel))
        event = first
        while event[0] == "delta":
            event = await next_event(job, request)
    except ClientGone:
        return Response(status_code=499)
    if event[0] == "error" or event[1] is None:
        raise job_error(event[1] if event[0] == "error" else ShuttingDown("the server is shutting down"))
    finished(st, request, job, event[1], t0)
    return answer.whole(event[1], await answer.ext(event[1], False))


def finished(st: ServerState, request: Request, job: Job, result: GenerationResult, t0: float) -> None:
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


async def _stream(st: ServerState, job: Job, first, answer: Answer, t0: float, request: Request):
    """The SSE body; the event with the finish reason carries the ``kvstash`` field and the log-probabilities
    of tokens no delta carried. If the client goes away the body is cancelled here and the job with it."""
    out, finished_ok, sent = answer.writer, False, 0
    try:
        opening = out.opening()
        if opening is not None:
            yield opening
        kind, value = first
        while kind == "delta":
            sent += len(value.logprobs or ())
            yield out.delta(value)
            kind, value = await job.next_event()
        if kind == "error" or value is None:
            err = job_error(value if kind == "error" else ShuttingDown("the server is shutting down"))
            log_fields(request, error=err.message)
            yield event(err.body())
        else:
            finished(st, request, job, value, t0)
            rest = None if value.logprobs is None else value.logprobs[sent:]
            yield out.finish(value, rest, await answer.ext(value, True))
            if answer.include_usage:
                yield out.usage(value)
            yield DONE
        finished_ok = True
    finally:
        if not finished_ok:
            job.cancel()
            log_fields(request, cancelled=True)


def event(body: BaseModel | dict) -> str:
    """One server-sent event carrying ``body`` as JSON (None fields left out)."""
    text = body.model_dump_json(exclude_none=True) if isinstance(body, BaseModel) else json.dumps(body)
    return f"data: {text}\n\n"
