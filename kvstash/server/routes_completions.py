"""``POST /v1/completions``: a text completion (no chat template), with the same ``documents`` and ``reuse``
extensions as chat; answered whole or streamed (:mod:`kvstash.server.generation`)."""

from __future__ import annotations

import time
import uuid

from fastapi import FastAPI, Request

from kvstash.engine import GenerationResult
from kvstash.server import chat, completions
from kvstash.server.generation import Answer, respond, start
from kvstash.server.requestlog import log_fields
from kvstash.server.routes_documents import named_documents
from kvstash.server.schemas import CompletionRequest
from kvstash.server.state import ServerState


def add_completion_routes(app: FastAPI, st: ServerState) -> None:
    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        t0 = time.perf_counter()
        model = st.check_model(body.model)
        completions.check_prompt(body, len(st.engine.tokenizer))
        limit = st.engine.lm.context_limit
        params = chat.sampling_params(body, limit, completions.DEFAULT_MAX_TOKENS, body.logprobs)
        method = chat.reuse_method(body.reuse, st.method, st.engine.config.prefill_chunk)
        docs = await named_documents(st, body.documents)
        rid, created, top = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body.logprobs or 0
        log_fields(request, request_id=rid, documents=len(docs), stream=bool(body.stream), reuse=method.name)

        def prepare():
            return completions.completion_plan(st.engine.builder, docs, body.prompt)

        async def ext(result: GenerationResult, streamed: bool) -> dict:
            return chat.extension(result, None, streamed)

        job, _ = start(st, prepare, params, method, "prompt")
        answer = Answer(
            stream=bool(body.stream),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            writer=completions.CompletionWriter(rid, created, model, top),
            whole=lambda result, e: completions.completion(rid, created, model, result, e, top),
            ext=ext,
        )
        return await respond(st, request, job, answer, t0)
