"""Chat requests to the engine and back: messages + documents -> segments, request -> sampling parameters,
a generation result -> OpenAI response bodies.

How messages become a prompt: every ``system`` (or ``developer``) message joins, in order and separated by a
blank line, into the system segment (none: the engine's default RAG instruction). The named documents'
chunks follow as document segments, in the order given. The conversation is the one user segment: with a
single user message it is that message; with earlier turns, they are rendered first as lines
``User: ...`` / ``Assistant: ...``, then a blank line, then the last message, which must be the user's.
"""

from __future__ import annotations

from kvstash.decoding import TextDelta, TokenLogprob
from kvstash.engine import GenerationResult
from kvstash.prompt import Segment
from kvstash.reuse import ReuseMethod, make_method
from kvstash.sampling import SamplingParams
from kvstash.server.documents import Document
from kvstash.server.generation import event
from kvstash.server.schemas import (
    ApiError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    ChatRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionRequest,
    Delta,
    Message,
    PromptTokensDetails,
    Usage,
)
from kvstash.server.schemas import TokenLogprob as TokenLogprobBody
from kvstash.server.schemas import TopLogprob as TopLogprobBody

DEFAULT_MAX_TOKENS = 256  # when a chat request names no max_tokens
MAX_STOP = 4  # stop strings per request, as in the OpenAI API
CHARS_PER_TOKEN = 16  # a message longer than this many characters per token of context cannot fit


def sampling_params(
    req: ChatRequest | CompletionRequest,
    context_limit: int,
    default_max: int = DEFAULT_MAX_TOKENS,
    logprobs: int | None = None,
) -> SamplingParams:
    """The request's sampling parameters (``logprobs``: alternatives per token, None for none at all);
    ApiError(400) when one is out of range."""
    if req.n not in (None, 1):
        raise ApiError(400, f"n={req.n} is not supported; kvstash returns one choice (n=1)", param="n")
    newer = getattr(req, "max_completion_tokens", None)
    param = "max_completion_tokens" if newer is not None else "max_tokens"
    max_tokens = newer if newer is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = min(default_max, context_limit - 1)
    elif not 1 <= max_tokens < context_limit:
        raise ApiError(
            400,
            f"{param} must be between 1 and {context_limit - 1} (the model's context), got {max_tokens}",
            param=param,
            code="invalid_value",
        )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or not all(stop):
        raise ApiError(400, f"stop takes up to {MAX_STOP} non-empty strings", param="stop", code="invalid_value")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature or 0.0,
        top_p=req.top_p if req.top_p is not None else 1.0,
        seed=req.seed,
        stop=tuple(stop),
        logprobs=logprobs,
        ignore_eos=req.ignore_eos,
    )


def chat_logprobs(req: ChatRequest) -> int | None:
    """How many alternatives per token the request asks for (None: no log-probabilities)."""
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    return (req.top_logprobs or 0) if req.logprobs else None


def check_messages(messages: list[Message], context_limit: int) -> None:
    """ApiError(400) for a message that could never fit the model's context, before anything is tokenized."""
    most = context_limit * CHARS_PER_TOKEN
    for i, m in enumerate(messages):
        if len(m.text()) > most:
            raise ApiError(
                400,
                f"messages[{i}] is {len(m.text())} characters, more than the model's context of {context_limit} "
                "tokens can hold; shorten it, or register long texts with POST /v1/documents",
                param=f"messages.{i}",
                code="context_length_exceeded",
            )


def reuse_method(spec: str | None, default: ReuseMethod, prefill_chunk: int) -> ReuseMethod:
    """The request's reuse method: its ``reuse`` field, validated like ``--reuse`` (ApiError(400) naming the
    methods when it is wrong); the server's own when omitted."""
    if spec is None:
        return default
    try:
        return make_method(spec, prefill_chunk)
    except ValueError as e:
        raise ApiError(400, str(e), param="reuse", code="invalid_value") from None


def build_segments(messages: list[Message], documents: list[Document]) -> list[Segment]:
    """System segment, the documents' chunks in order, then the conversation (see the module docstring)."""
    system = [m.text() for m in messages if m.role in ("system", "developer")]
    turns = [m for m in messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user" or not turns[-1].text().strip():
        raise ApiError(400, "the last non-system message must be a non-empty user message", param="messages")
    *earlier, last = turns
    user = last.text()
    if earlier:
        lines = [f"{'User' if m.role == 'user' else 'Assistant'}: {m.text()}" for m in earlier]
        user = "\n".join(lines) + "\n\n" + user
    segments = [Segment("\n\n".join(system), "system")] if system else []
    segments += [Segment(chunk) for doc in documents for chunk in doc.chunks]
    return [*segments, Segment(user, "user")]


def usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=result.prefill.reused_tokens),
    )


def extension(result: GenerationResult, view: list[dict] | None = None, streamed: bool = False) -> dict:
    """The response's ``kvstash`` field: the engine's summary (less the answer when it was streamed), and the
    token view (:mod:`kvstash.server.tokenview`) when the request asked for it."""
    out = result.summary()
    if streamed:
        del out["answer"]
    if view is not None:
        out["token_view"] = view
    return out


def logprobs_body(entries: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    """Log-probabilities in the chat API's shape (``content``: one entry per token)."""
    if entries is None:
        return None

    def top(token: str, logprob: float) -> TopLogprobBody:
        return TopLogprobBody(token=token, logprob=logprob, bytes=list(token.encode()))

    content = [
        TokenLogprobBody(**top(e.token, e.logprob).model_dump(), top_logprobs=[top(t.token, t.logprob) for t in e.top])
        for e in entries
    ]
    return ChoiceLogprobs(content=content)


def completion(rid: str, created: int, model: str, result: GenerationResult, ext: dict) -> ChatCompletion:
    choice = Choice(
        message=ChatMessage(content=result.text),
        finish_reason=result.finish_reason,
        logprobs=logprobs_body(result.logprobs),
    )
    return ChatCompletion(id=rid, created=created, model=model, choices=[choice], usage=usage(result), kvstash=ext)


class ChunkWriter:
    """Server-sent events of one streamed chat completion (``data: {chat.completion.chunk}``); a
    :class:`kvstash.server.generation.Writer`."""

    def __init__(self, rid: str, created: int, model: str) -> None:
        self.rid, self.created, self.model = rid, created, model

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None, ext: dict | None = None) -> str:
        body = ChatCompletionChunk(
            id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage, kvstash=ext
        )
        return event(body)

    def opening(self) -> str:
        return self._chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])

    def delta(self, delta: TextDelta) -> str:
        return self._chunk([ChunkChoice(delta=Delta(content=delta.text), logprobs=logprobs_body(delta.logprobs))])

    def finish(self, result: GenerationResult, logprobs: list[TokenLogprob] | None, ext: dict) -> str:
        choice = ChunkChoice(delta=Delta(), finish_reason=result.finish_reason, logprobs=logprobs_body(logprobs))
        return self._chunk([choice], ext=ext)

    def usage(self, result: GenerationResult) -> str:
        return self._chunk([], usage(result))
