"""Sampling parameters and next-token selection (greedy, temperature, top-k, top-p), seeded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # alternatives per token, as in the OpenAI API


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: off; k: each chosen token's log-probability and the k likeliest (<= 20)
    ignore_eos: bool = False  # go on past an end-of-sequence token to max_tokens (fixed-length benchmark answers)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, int | float) or not 0 <= self.temperature <= 10:
            raise ValueError(f"temperature must be a number in [0, 10], got {self.temperature!r}")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside top-k and the top-p nucleus with -inf. logits: [V] float32 -> [V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token is always kept)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token id from logits [V]."""
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits, params), 1, generator=generator))


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution :func:`sample` draws from (temperature, top-k, top-p applied): [V] float32."""
    return filter_logits(logits.float() / params.temperature, params.top_k, params.top_p).softmax(-1)


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under the model's own distribution (log_softmax of the raw logits [V],
    before temperature and top-p), and the ``k`` likeliest tokens with theirs, likeliest first."""
    lp = torch.log_softmax(logits.float(), -1)
    top = torch.topk(lp, k) if k else None
    pairs = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return float(lp[token]), pairs


def sample_with_drafts(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, drafts: Sequence[int]
) -> int:
    """Pick the next token with the distribution of :func:`sample`, trying proposed ``drafts`` first.

    Speculative sampling for deterministic drafts (SpecInfer's multi-step speculative sampling with point-mass
    proposals): draft d is accepted with probability p(d) under the residual distribution; on a rejection d's
    mass is removed and the rest renormalized; if every draft is rejected, the token is drawn from what is
    left. Greedy: the argmax (a draft or not)."""
    if params.greedy:
        return int(logits.argmax())
    p = probabilities(logits, params).clone()
    for d in dict.fromkeys(drafts):  # each distinct draft once, in order
        mass = float(p.sum())
        if mass <= 0:
            break
        if float(torch.rand(1, generator=generator)) * mass < float(p[d]):
            return int(d)
        p[d] = 0.0
    return int(torch.multinomial(p / p.sum(), 1, generator=generator))
