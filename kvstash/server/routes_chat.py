"""``POST /v1/chat/completions``: one generation on the model worker (:mod:`kvstash.server.generation`),
answered whole or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import FastAPI, Request

from kvstash.engine import GenerationResult
from kvstash.server import chat
from kvstash.server.documents import Document
from kvstash.server.generation import Answer, Extension, Planned, respond, start
from kvstash.server.requestlog import log_fields
from kvstash.server.routes_documents import named_documents
from kvstash.server.schemas import ChatRequest
from kvstash.server.state import ServerState
from kvstash.server.tokenview import token_view


def _extension(st: ServerState, body: ChatRequest, planned: Planned, docs: list[Document]) -> Extension:
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
        limit = st.engine.lm.context_limit
        chat.check_messages(body.messages, limit)
        params = chat.sampling_params(body, limit, logprobs=chat.chat_logprobs(body))
        method = chat.reuse_method(body.reuse, st.method, st.engine.config.prefill_chunk)
        docs = await named_documents(st, body.documents)
        segments = chat.build_segments(body.messages, docs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        log_fields(request, request_id=rid, documents=len(docs), stream=bool(body.stream), reuse=method.name)
        job, planned = start(st, lambda: st.engine.plan(segments), params, method, "messages")
        answer = Answer(
            stream=bool(body.stream),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            writer=chat.ChunkWriter(rid, created, model),
            whole=lambda result, ext: chat.completion(rid, created, model, result, ext),
            ext=_extension(st, body, planned, docs),
        )
        return await respond(st, request, job, answer, t0)
