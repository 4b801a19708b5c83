"""Text completions (``/v1/completions``) to the engine and back: the prompt as a plan with no chat template
(the named documents' chunks, then the prompt's text or token ids), and OpenAI's ``text_completion`` bodies
with the legacy log-probability shape (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``)."""

from __future__ import annotations

from kvstash.decoding import TextDelta, TokenLogprob
from kvstash.engine import GenerationResult
from kvstash.prompt import PlannedSegment, PromptBuilder, PromptPlan
from kvstash.server.chat import usage
from kvstash.server.documents import Document
from kvstash.server.generation import event
from kvstash.server.schemas import ApiError, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest

DEFAULT_MAX_TOKENS = 16  # when a completion request names no max_tokens, as in the OpenAI API


def check_prompt(req: CompletionRequest, vocab_size: int) -> None:
    """ApiError(400) for an empty prompt, token ids outside the vocabulary, or options kvstash does not take."""
    if req.echo:
        raise ApiError(400, "echo is not supported; the prompt is not repeated in the answer", param="echo")
    if not req.prompt or (isinstance(req.prompt, str) and not req.prompt.strip()):
        raise ApiError(400, "prompt is empty; send text or a list of token ids", param="prompt")
    if isinstance(req.prompt, list):
        check_token_ids(req.prompt, vocab_size, "prompt", "send valid ids or text")


def check_token_ids(ids: list[int], vocab_size: int, param: str, hint: str) -> None:
    """ApiError(400) naming ``param`` when an id is outside the vocabulary; ``hint`` says what to send instead."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(
            400,
            f"{param} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}; {hint}",
            param=param,
            code="invalid_value",
        )


def completion_plan(builder: PromptBuilder, documents: list[Document], prompt: str | list[int]) -> PromptPlan:
    """The documents' chunks (each tokenized alone, so their KV is reused as in chat) and then the prompt,
    with no chat template around them."""
    pieces = [("document", builder.tokenize(chunk, "document")) for doc in documents for chunk in doc.chunks]
    pieces.append(("user", builder.tokenize(prompt, "user") if isinstance(prompt, str) else tuple(prompt)))
    segments, ids = [], []
    for kind, tokens in pieces:
        if tokens:
            segments.append(PlannedSegment(kind, tokens, len(ids)))
            ids.extend(tokens)
    return PromptPlan(tuple(segments), tuple(ids))


def legacy_logprobs(entries: list[TokenLogprob] | None, top: int, offset: int = 0) -> CompletionLogprobs | None:
    """Log-probabilities in the completions API's shape; ``text_offset`` counts characters of the answer from
    ``offset``."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{t.token: t.logprob for t in e.top} for e in entries] if top else None,
        text_offset=offsets,
    )


def completion(rid: str, created: int, model: str, result: GenerationResult, ext: dict, top: int) -> Completion:
    choice = CompletionChoice(
        text=result.text, finish_reason=result.finish_reason, logprobs=legacy_logprobs(result.logprobs, top)
    )
    return Completion(id=rid, created=created, model=model, choices=[choice], usage=usage(result), kvstash=ext)


class CompletionWriter:
    """Server-sent events of one streamed text completion; a :class:`kvstash.server.generation.Writer`."""

    def __init__(self, rid: str, created: int, model: str, top: int) -> None:
        self.rid, self.created, self.model, self.top = rid, created, model, top
        self.offset = 0  # characters of logprob tokens sent so far (text_offset)

    def _event(self, choices: list[CompletionChoice], **fields) -> str:
        return event(Completion(id=self.rid, created=self.created, model=self.model, choices=choices, **fields))

    def _logprobs(self, entries: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        body = legacy_logprobs(entries, self.top, self.offset)
        self.offset += sum(len(e.token) for e in entries or ())
        return body

    def opening(self) -> None:
        return None

    def delta(self, delta: TextDelta) -> str:
        return self._event([CompletionChoice(text=delta.text, logprobs=self._logprobs(delta.logprobs))])

    def finish(self, result: GenerationResult, logprobs: list[TokenLogprob] | None, ext: dict) -> str:
        choice = CompletionChoice(text="", finish_reason=result.finish_reason, logprobs=self._logprobs(logprobs))
        return self._event([choice], kvstash=ext)

    def usage(self, result: GenerationResult) -> str:
        return self._event([], usage=usage(result))
