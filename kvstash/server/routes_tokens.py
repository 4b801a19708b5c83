"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes: text to the model's token ids and back."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from kvstash.server.completions import check_token_ids
from kvstash.server.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from kvstash.server.state import ServerState


def add_token_routes(app: FastAPI, st: ServerState) -> None:
    tokenizer = st.engine.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        st.check_model(body.model)
        ids = await asyncio.to_thread(
            lambda: tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        )
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=st.engine.lm.context_limit)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        st.check_model(body.model)
        check_token_ids(body.tokens, len(tokenizer), "tokens", "send ids /tokenize returned")
        return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, body.tokens))
