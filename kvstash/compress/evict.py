"""Eviction policies: which of the prompt's tokens keep their KV within a budget, per layer and KV head.

Each policy is a dataclass that overrides one ``score()``: ``[layers, kv_heads, n]``, higher = keep. The base
class does the shared work: the budget becomes a token count, the protected tokens (SnapKV's observation
window, StreamingLLM's sinks, H2O's recent window) are always kept, the rest is the top-k per layer and
head, kept slots are sorted, and ``cache.keep(slots)`` drops the others. ``parse_evict("snapkv:0.25")`` maps
what a user types to a policy.

Attention-based scores come from replaying prompt queries against the finished cache
(:func:`kvstash.model.replay.attention_votes`). SnapKV replays its last ``window`` tokens (about 1% of a
3K-token prefill); H2O replays every prompt token in blocks (about one more prefill). While decoding, H2O adds
each new query's attention through a layer hook of the decoding forward, and StreamingLLM needs none
(:class:`DecodeEvictor`).

Slots are in position order (prefill, eviction and decoding all keep them so): "recent" means a high slot.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from kvstash.cache.kv import KVCache
from kvstash.model.attention import attention_probs, votes_per_kv_head
from kvstash.model.replay import attention_votes
from kvstash.model.runner import LayerHook, Runner


def top_slots(scores: torch.Tensor, protected: torch.Tensor, m: int) -> torch.Tensor:
    """Slots to keep: every protected one, then the highest scores (ties: the lower slot) up to ``m`` per
    layer and head. scores: [L, KVH, n]; protected: [n] bool -> sorted slots [L, KVH, max(m, protected)]."""
    m = max(m, int(protected.sum()))
    ranked = scores.float().masked_fill(protected, float("inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :m]
    return order.sort(dim=-1).values


# --- policies ----------------------------------------------------------------------------------------------
class EvictionReport(NamedTuple):
    before: int  # tokens in the cache before eviction
    kept: int  # tokens per layer and head after
    scores: torch.Tensor  # [L, KVH, before]: what the choice was made on


@dataclass(frozen=True)
class EvictionPolicy(ABC):
    """Keep ``budget`` of the prompt's tokens: a ratio in (0, 1) or a token count >= 1. The protected tokens
    are always kept, so a budget below them keeps just them. ``decode``: also hold the cache at the budget
    while decoding (policies with ``decodes``)."""

    budget: float | int
    window: int = 32  # recent tokens always kept (SnapKV: also the queries that vote)
    decode: bool = False

    name: ClassVar[str]
    decodes: ClassVar[bool] = False  # can keep evicting while decoding
    tracks_attention: ClassVar[bool] = False  # needs the decoding queries' attention for that

    def __post_init__(self) -> None:
        b = self.budget
        ok = (isinstance(b, float) and 0.0 < b < 1.0) or (isinstance(b, int) and not isinstance(b, bool) and b >= 1)
        if not ok:
            raise ValueError(
                f"{self.name}: budget {b!r} must be a ratio of the prompt in (0, 1), e.g. 0.25, "
                f"or a whole number of tokens >= 1, e.g. 512"
            )
        if self.window < 0:
            raise ValueError(f"{self.name}: window must be >= 0 tokens, got {self.window}")
        if self.decode and not self.decodes:
            raise ValueError(f"{self.name} applies after prefill only; drop ':decode'")

    def budget_tokens(self, n: int) -> int:
        """Tokens to keep of a prompt of ``n`` (before the protected ones are added back)."""
        m = round(self.budget * n) if isinstance(self.budget, float) else self.budget
        return min(n, max(1, m))

    def protected(self, n: int, m: int) -> torch.Tensor:
        """[n] bool: slots kept whatever the scores say, with ``m`` to keep. Default: the ``window`` most recent."""
        keep = torch.zeros(n, dtype=torch.bool)
        keep[max(0, n - self.window) :] = True
        return keep

    @abstractmethod
    def score(self, runner: Runner, cache: KVCache, token_ids) -> torch.Tensor:
        """[L, KVH, n] float, higher = keep, for the prompt's cache right after prefill. Changes nothing."""

    def apply(self, runner: Runner, cache: KVCache, token_ids, scores: torch.Tensor | None = None) -> EvictionReport:
        """Evict from the prompt's cache (right after prefill) down to the budget. Changes ``cache``.

        ``scores``: what :meth:`score` gave for this same cache, to share one scoring across budgets."""
        n = cache.length
        scores = self.score(runner, cache, token_ids) if scores is None else scores
        m = self.budget_tokens(n)
        if m < n:
            cache.keep(top_slots(scores, self.protected(n, m), m))
        return EvictionReport(n, cache.length, scores)

    def decode_scores(self, cache: KVCache, votes: torch.Tensor | None) -> torch.Tensor:
        """[L, KVH, n] scores while decoding (``votes``: accumulated attention when ``tracks_attention``)."""
        raise NotImplementedError(f"{self.name} does not evict while decoding")


POLICIES: dict[str, type[EvictionPolicy]] = {}


def register_policy(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    POLICIES[cls.name] = cls
    return cls


@register_policy
@dataclass(frozen=True)
class SnapKV(EvictionPolicy):
    """SnapKV: the last ``window`` prompt queries vote (attention summed over them, averaged over each KV
    head's query heads), votes are max-pooled over ``kernel`` neighbouring tokens so a kept token keeps
    its context, and each KV head keeps its own top tokens. The window itself is always kept."""

    # The paper pools over 7. With SmolLM2-135M the question's queries vote for the needle's words, not for
    # the digits after them: on the first 7 needle prompts at 25%, kernel 7 kept 0 of the 4 answers the full
    # cache got right, 15 kept all 4 (a probe made while building benchmarks/compression.py).
    kernel: int = 15

    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv: kernel must be an odd number >= 1, got {self.kernel}")

    def score(self, runner: Runner, cache: KVCache, token_ids) -> torch.Tensor:
        n = cache.length
        votes = attention_votes(runner, cache, token_ids, max(0, n - self.window), n)  # [L, KVH, n]
        pooled = F.max_pool1d(votes.view(-1, 1, n), self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.view_as(votes)


@register_policy
@dataclass(frozen=True)
class StreamingLLM(EvictionPolicy):
    """StreamingLLM: the first ``sinks`` tokens (attention sinks) plus the most recent ones. The same tokens
    in every layer and head, so the cache stays uniform. ``window`` is unused: recency is the score."""

    sinks: int = 4
    window: int = 0

    name: ClassVar[str] = "streaming"
    decodes: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError(f"streaming: sinks must be >= 0 tokens, got {self.sinks}")

    def protected(self, n: int, m: int) -> torch.Tensor:
        keep = torch.zeros(n, dtype=torch.bool)
        keep[: self.sinks] = True
        return keep

    def score(self, runner: Runner, cache: KVCache, token_ids) -> torch.Tensor:
        return self.decode_scores(cache, None)

    def decode_scores(self, cache: KVCache, votes: torch.Tensor | None) -> torch.Tensor:
        return cache.pos[:, :, : cache.length].float()  # newer = higher


@register_policy
@dataclass(frozen=True)
class H2O(EvictionPolicy):
    """H2O-style heavy hitters: attention accumulated over every prompt query (and, with ``decode``, every
    generated one), per KV head. As in H2O, a ``recent`` share of the budget goes to the most recent tokens
    (at least ``window``): accumulated attention favours early tokens, which more queries see."""

    recent: float = 0.5
    block: int = 512  # query tokens replayed at once (bounds the [H, block, n] attention weights)

    name: ClassVar[str] = "h2o"
    decodes: ClassVar[bool] = True
    tracks_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"h2o: recent must be a share of the budget in [0, 1], got {self.recent}")

    def protected(self, n: int, m: int) -> torch.Tensor:
        keep = torch.zeros(n, dtype=torch.bool)
        keep[max(0, n - max(self.window, round(self.recent * m))) :] = True
        return keep

    def score(self, runner: Runner, cache: KVCache, token_ids) -> torch.Tensor:
        return attention_votes(runner, cache, token_ids, 0, cache.length, self.block)

    def decode_scores(self, cache: KVCache, votes: torch.Tensor | None) -> torch.Tensor:
        assert votes is not None
        return votes


# --- while decoding -----------------------------------------------------------------------------------------
class DecodeEvictor(LayerHook):
    """Holds a decoding cache at ``limit`` tokens per layer and head, as the ``hook`` of each decoding
    ``Runner.forward``: :meth:`observe` adds each new query's attention to the slots' votes (attention-tracking
    policies), and once the step is done (:meth:`step`) the policy scores what is cached and the lowest go."""

    def __init__(self, policy: EvictionPolicy, limit: int, votes: torch.Tensor | None):
        self.policy = policy
        self.limit = limit
        self.votes = votes  # [L, KVH, n] aligned with the cache's slots (attention-tracking policies only)

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self.votes is None:
            return
        n = k.shape[1]
        if self.votes.shape[-1] < n:  # new tokens start with no votes
            self.votes = F.pad(self.votes, (0, n - self.votes.shape[-1]))
        self.votes[layer] += votes_per_kv_head(attention_probs(q, k, mask), k.shape[0])

    def step(self, cache: KVCache) -> None:
        """Evict down to ``limit`` if the cache grew past it. Changes ``cache``."""
        n = cache.length
        if n <= self.limit:
            return
        if self.votes is not None and self.votes.shape[-1] < n:
            self.votes = F.pad(self.votes, (0, n - self.votes.shape[-1]))
        scores = self.policy.decode_scores(cache, self.votes)
        slots = top_slots(scores, self.policy.protected(n, self.limit), self.limit)
        cache.keep(slots)
        if self.votes is not None:
            self.votes = torch.gather(self.votes[..., :n], 2, slots)

    def done(self, cache: KVCache) -> None:
        self.step(cache)


def start_eviction(policy: EvictionPolicy, runner: Runner, cache: KVCache, token_ids) -> DecodeEvictor | None:
    """Evict from the prompt's cache now; returns the evictor to run while decoding when ``policy.decode``."""
    report = policy.apply(runner, cache, token_ids)
    if not policy.decode:
        return None
    votes = None
    if policy.tracks_attention:
        slots = cache.pos[:, :, : cache.length]  # slot i of the prompt was at position i
        votes = torch.gather(report.scores, 2, slots).clone()
    return DecodeEvictor(policy, cache.length, votes)


# --- what a user types ---------------------------------------------------------------------------------------
def parse_budget(text: str) -> float | int:
    """``"0.25"`` -> 0.25 (a ratio), ``"512"`` -> 512 (tokens). ValueError otherwise."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = None
    if isinstance(value, int) and value >= 1 or isinstance(value, float) and 0.0 < value < 1.0:
        return value
    raise ValueError(
        f"eviction budget {text!r} must be a ratio of the prompt in (0, 1) such as 0.25, "
        f"or a whole number of tokens >= 1 such as 512"
    )


def parse_evict(spec: str) -> EvictionPolicy:
    """``NAME:BUDGET[:decode]``, e.g. ``snapkv:0.25``, ``streaming:0.1``, ``h2o:512:decode``.

    Raises ValueError naming the known policies or the budget's form.
    """
    name, _, rest = str(spec).partition(":")
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r} in {spec!r}; choose one of: {', '.join(POLICIES)}")
    if not rest:
        raise ValueError(f"--evict {spec!r} needs a budget: {name}:0.25 (a ratio) or {name}:512 (tokens)")
    budget, _, flag = rest.partition(":")
    if flag not in ("", "decode"):
        raise ValueError(f"--evict {spec!r}: the only option after the budget is ':decode'")
    return POLICIES[name](parse_budget(budget), decode=flag == "decode")
