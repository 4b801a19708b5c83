"""One sequence's decoding: the next token from each step's logits, stop strings, when to stop, and the result.

The engine's single-stream loop and the batching scheduler both feed a :class:`Decoding` one logits row per
step, so a sequence ends, and its text streams, the same way whether it runs alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from kvstash.detok import TextStream
from kvstash.reuse.report import PrefillReport
from kvstash.sampling import SamplingParams, sample, sample_with_drafts, token_logprobs


class TopLogprob(NamedTuple):
    token_id: int
    token: str  # the token's text alone
    logprob: float


class TokenLogprob(NamedTuple):
    """A chosen token's log-probability (log_softmax of the raw logits) and the likeliest alternatives."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...]  # SamplingParams.logprobs of them, likeliest first


class TextDelta(NamedTuple):
    """What one step of a sequence adds: its text, and the log-probabilities of the tokens chosen since the last
    delta (None unless the request asked for them)."""

    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens or the context limit)
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    ttft_s: float  # request start -> first token chosen (planning, loading, prefill, first sample)
    prefill_tok_s: float  # prompt tokens computed per second of compute during prefill
    decode_s: float
    decode_tok_s: float  # tokens per second after the first one
    prefill: PrefillReport = field(repr=False)
    kv_bytes: int = 0  # K/V bytes of the prompt's decode cache after eviction / quantization (--evict, --kv-bits)
    speculation: dict | None = None  # forwards, drafted and accepted tokens of speculative decoding (None: off)
    logprobs: list[TokenLogprob] | None = None  # one per completion token, when SamplingParams.logprobs asked

    def summary(self) -> dict:
        """The flat JSON view used by the CLI and the benchmarks."""
        r = self.prefill
        return {
            "answer": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": round(self.ttft_s, 4),
            "prefill_tok_s": round(self.prefill_tok_s, 1),
            "decode_tok_s": round(self.decode_tok_s, 1),
            "reuse": r.method,
            "reused_tokens": r.reused_tokens,
            "recomputed_tokens": r.recomputed_tokens,
            "computed_tokens": r.recomputed_tokens,
            "load_s": round(r.load_s, 4),
            "recompute_s": round(r.compute_s, 4),
            "store_s": round(r.store_s, 4),
            "tier_hits": dict(r.tier_hits),
            "kv_bytes": self.kv_bytes,
            **({"blend_ratio": round(r.blend_ratio, 4)} if r.blend_ratio is not None else {}),
            **({"kv_head_bits": r.kv_head_bits} if r.kv_head_bits else {}),
            **({"speculation": self.speculation} if self.speculation is not None else {}),
        }


class Decoding:
    """Feed :meth:`step` the logits after the prompt, then after each token it asked for (``token`` at
    ``position``), until ``finish_reason`` is set.

    ``finish_reason`` is "stop" (an end-of-sequence token or a stop string) or "length" (``max_tokens`` or
    the model's context limit); None while decoding goes on.
    """

    def __init__(self, tokenizer, eos_ids: set[int], params: SamplingParams, prompt_tokens: int, context_limit: int):
        self.params = params
        self.eos_ids = eos_ids
        self.context_limit = context_limit
        self.rng = params.generator()
        self.tokenizer = tokenizer
        self.text = TextStream(tokenizer, params.stop)
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []  # one per answer token
        self._sent = 0  # logprobs handed out by new_logprobs
        self._chosen: TokenLogprob | None = None  # the last choice's, until it is pushed
        self.position = prompt_tokens  # where the next token to feed goes
        self.token: int | None = None  # the token to feed next (its KV is not cached yet)
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        return self.text.ids

    def step(self, logits: torch.Tensor) -> str:
        """Sample from ``logits`` [vocab] and return the text it adds (may be ""; the held-back tail of the text
        comes with the last step). Sets ``finish_reason`` when the sequence ends; else ``token`` is what the
        next forward feeds, at ``position``."""
        return self.push(self.choose(logits))

    def choose(self, logits: torch.Tensor, drafts: Sequence[int] = ()) -> int:
        """The next token from ``logits`` [vocab]; with ``drafts`` (proposed tokens), by speculative sampling, so
        the choice has the same distribution as without them (greedy: the argmax either way)."""
        if drafts:
            token = sample_with_drafts(logits, self.params, self.rng, drafts)
        else:
            token = sample(logits, self.params, self.rng)
        if self.logprobs is not None:
            self._chosen = self._logprob(logits, token)
        return token

    def _logprob(self, logits: torch.Tensor, token: int) -> TokenLogprob:
        logprob, top = token_logprobs(logits, token, self.params.logprobs)
        text = self.tokenizer.decode
        alternatives = tuple(TopLogprob(t, text([t]), lp) for t, lp in top)
        return TokenLogprob(token, text([token]), logprob, alternatives)

    def new_logprobs(self) -> list[TokenLogprob] | None:
        """The answer tokens' log-probabilities not handed out before (None when the request did not ask)."""
        if self.logprobs is None:
            return None
        new, self._sent = self.logprobs[self._sent :], len(self.logprobs)
        return new

    def push(self, token: int) -> str:
        """Take ``token`` as the next one of the answer (the previous one counts as fed); returns its text."""
        if self.token is not None:
            self.position += 1  # the previous token was fed at the old position
        delta = ""
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
        else:
            if self.logprobs is not None and self._chosen is not None and self._chosen.token_id == token:
                self.logprobs.append(self._chosen)
            delta = self.text.push(token)
            if self.text.stopped:
                self.finish_reason = "stop"
            elif len(self.text.ids) >= self.params.max_tokens or self.position + 1 >= self.context_limit:
                self.finish_reason = "length"
        self.token = None if self.finished else token
        if self.finished:
            delta += self.text.flush()
        return delta

    def result(self, report: PrefillReport, ttft: float, decode_s: float, kv_bytes: int) -> GenerationResult:
        """The :class:`GenerationResult` of this finished decoding (``report``: its prompt's prefill)."""
        n = len(self.token_ids)
        return GenerationResult(
            text=self.text.text,
            finish_reason=self.finish_reason,
            prompt_tokens=report.prompt_tokens,
            completion_tokens=n,
            token_ids=list(self.token_ids),
            ttft_s=ttft,
            prefill_tok_s=report.recomputed_tokens / report.compute_s if report.compute_s > 0 else 0.0,
            decode_s=decode_s,
            decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            prefill=report,
            kv_bytes=kv_bytes,
            logprobs=None if self.logprobs is None else list(self.logprobs),
        )
