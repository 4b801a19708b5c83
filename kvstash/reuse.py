"""Reuse methods: how a prompt's KV is built from what the chunk store has.

Each method overrides one ``prefill``; the base class owns the shared work. ``full`` computes everything;
``prefix``, ``naive`` and ``blend`` live in :mod:`kvstash.blend` and register here by name.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvstash.forward import Runner
from kvstash.kv import KVCache
from kvstash.prompt import PromptPlan


@dataclass
class SegmentReport:
    """What happened to one segment of the prompt."""

    kind: str
    tokens: int
    reused: int = 0  # tokens whose KV came from the store
    recomputed: int = 0  # tokens computed in this request
    tier: str | None = None  # tier the chunk was found in (None: not looked up or a miss)


@dataclass
class PrefillReport:
    method: str
    prompt_tokens: int
    segments: list[SegmentReport] = field(default_factory=list)
    load_s: float = 0.0  # fetching chunk KV from the store (and re-positioning it)
    compute_s: float = 0.0  # running the model over the tokens that are (re)computed
    store_s: float = 0.0  # writing newly computed chunk KV into the store
    gate_fired: int = 0  # chunks the quality gate sent to full recompute
    tier_hits: dict[str, int] = field(default_factory=dict)
    kv_head_bits: list | None = None  # [layer][kv head] = [key bits, value bits] with --kv-alloc mixed

    @property
    def reused_tokens(self) -> int:
        return sum(s.reused for s in self.segments)

    @property
    def recomputed_tokens(self) -> int:
        return sum(s.recomputed for s in self.segments)

    @property
    def recomputed_ratio(self) -> float:
        return self.recomputed_tokens / max(1, self.prompt_tokens)


@dataclass
class Prefilled:
    cache: KVCache
    last_logits: torch.Tensor  # [vocab] float32: the distribution of the first generated token
    report: PrefillReport


class ReuseMethod(ABC):
    """Builds the KV cache for a whole prompt plan."""

    name: ClassVar[str]

    @abstractmethod
    def prefill(self, runner: Runner, plan: PromptPlan, chunks) -> Prefilled:
        """Return a cache holding every prompt token and the logits after the last one.

        ``chunks`` is the engine's chunk source (a :class:`kvstash.chunks.ChunkSource` or None for no store).
        """


def compute_tokens(runner: Runner, cache: KVCache, ids, start_pos: int, chunk: int) -> torch.Tensor:
    """Plain (chunked) prefill of ``ids`` from ``start_pos`` onto ``cache``; returns the last token's logits."""
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    logits = None
    for s in range(0, len(ids_t), chunk):
        part = ids_t[s : s + chunk]
        logits = runner.forward(part, torch.arange(start_pos + s, start_pos + s + len(part)), cache)
    assert logits is not None, "empty prompt"
    return logits


class FullPrefill(ReuseMethod):
    """No reuse: compute every token (the baseline every other method is measured against)."""

    name = "full"

    def __init__(self, prefill_chunk: int = 512):
        self.prefill_chunk = prefill_chunk

    def prefill(self, runner: Runner, plan: PromptPlan, chunks=None) -> Prefilled:
        t0 = time.perf_counter()
        cache = runner.new_cache(len(plan) + 64)
        logits = compute_tokens(runner, cache, plan.token_ids, 0, self.prefill_chunk)
        report = PrefillReport(self.name, len(plan), compute_s=time.perf_counter() - t0)
        report.segments = [SegmentReport(s.kind, len(s.token_ids), recomputed=len(s.token_ids)) for s in plan.segments]
        return Prefilled(cache, logits, report)


REUSE_METHODS: dict[str, type[ReuseMethod]] = {"full": FullPrefill}
DEFAULT_RATIO = 0.15


def make_method(spec: str, prefill_chunk: int = 512, **opts) -> ReuseMethod:
    """Build a method from what a user types: ``full``, ``prefix``, ``naive``, ``blend``, ``blend:0.3``,
    ``cacheblend`` or ``cacheblend:0.3``.

    ``opts`` are blend options (ratio, check_layer, select_by, gate, query_share, stale_bias); None values are ignored.
    """
    import kvstash.blend as blend  # registers prefix, naive, blend

    name, _, arg = str(spec).partition(":")
    if name not in REUSE_METHODS:
        raise ValueError(f"unknown reuse method {spec!r}; choose one of: {', '.join(REUSE_METHODS)} (blend:RATIO)")
    opts = {k: v for k, v in opts.items() if v is not None}
    if arg:
        if name not in ("blend", "cacheblend"):
            raise ValueError(f"only blend and cacheblend take a ratio (blend:0.15), got {spec!r}")
        try:
            opts["ratio"] = float(arg)
        except ValueError:
            raise ValueError(f"blend ratio must be a number, e.g. blend:0.15; got {arg!r}") from None
    if name == "cacheblend" and (opts.get("query_share") or opts.get("stale_bias")):
        raise ValueError(
            "cacheblend is plain CacheBlend (no question share, no stale bias); use blend with --query-share "
            "or --stale-bias"
        )
    cls = REUSE_METHODS[name]
    if name in ("naive", "blend", "cacheblend"):
        return cls(blend.BlendConfig(**opts), prefill_chunk=prefill_chunk)
    return cls(prefill_chunk=prefill_chunk)


def register_method(cls: type[ReuseMethod]) -> type[ReuseMethod]:
    REUSE_METHODS[cls.name] = cls
    return cls
