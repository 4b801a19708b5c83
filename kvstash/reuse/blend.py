"""``blend`` (CacheBlend selective recompute with a question-focused budget) and ``cacheblend`` (plain CacheBlend).

All tokens run in full up to a check layer; there the reused tokens to recompute are chosen, and only they
(plus the segments with no cached KV) run on through the later layers, attending over the merged cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from kvstash.cache.kv import KVCache
from kvstash.model.attention import attention_probs
from kvstash.model.runner import Runner, Steps
from kvstash.reuse.layout import Layout
from kvstash.reuse.partial import NaiveReuse, PartialPrefill
from kvstash.reuse.selection import deviation, gate, top_share

DEFAULT_RATIO = 0.15


@dataclass(frozen=True)
class BlendConfig:
    """What a user sets for ``blend`` (``--ratio``, ``--check-layer``, ``--query-share``, ``--stale-bias``,
    ``--gate``). Study variants live beside the study (``benchmarks/blend_variants.py``)."""

    ratio: float = DEFAULT_RATIO  # share of reused tokens recomputed in every layer after the check layer
    check_layer: int = 1  # layer where fresh and cached KV are compared (layers before it run in full)
    query_share: float = 0.75  # share of the budget for the tokens the question attends to (0: plain CacheBlend)
    stale_bias: float = -0.25  # added to the attention logits of the reused tokens not recomputed, from the check
    # layer on, in prefill and decoding (APE's scaling factor: their weight times e^stale_bias, ~0.78 here;
    # 0 turns it off). Only when something is recomputed: at r = 0 blend is naive reuse exactly
    gate: float | None = None  # recompute a whole chunk when its mean relative deviation exceeds this

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"blend ratio must be in [0, 1], got {self.ratio}")
        if self.check_layer < 0:
            raise ValueError(f"check_layer must be >= 0, got {self.check_layer}")
        if not 0.0 <= self.query_share <= 1.0:
            raise ValueError(f"query_share must be in [0, 1], got {self.query_share}")
        if not math.isfinite(self.stale_bias):
            raise ValueError(f"stale_bias must be a finite logit offset, got {self.stale_bias}")
        if self.gate is not None and self.gate <= 0:
            raise ValueError(f"gate must be a positive relative deviation, got {self.gate}")


class BlendReuse(PartialPrefill):
    """CacheBlend: all tokens run in full up to the check layer; there the reused tokens whose fresh KV
    deviates most from the cached KV are chosen, and only they (plus uncached segments) run on.

    Question-focused by default: a share ``query_share`` of the budget first goes to the reused tokens the
    question attends to most in a cheap naive probe (:func:`question_focus`); the rest by value deviation. The
    reused tokens left stale then get ``stale_bias`` on their attention logits (a little less weight)."""

    name = "blend"

    def __init__(self, cfg: BlendConfig | None = None, prefill_chunk: int = 512):
        super().__init__(prefill_chunk)
        self.cfg = cfg or BlendConfig()

    @property
    def first_check(self) -> int:
        return self.cfg.check_layer

    @property
    def last_check(self) -> int:
        """The check layer after which the chosen tokens stay fixed (a study may check at several layers)."""
        return self.cfg.check_layer

    def checks_at(self, layer: int) -> bool:
        return layer == self.cfg.check_layer

    def share_at(self, step: int) -> float:
        """Share of the reused tokens kept at the ``step``-th check (0 = ``check_layer``)."""
        return self.cfg.ratio

    def pass_steps(self, runner: Runner, cache: KVCache, layout: Layout, observe=None) -> Steps:
        if self.cfg.query_share > 0 and self.cfg.ratio > 0 and bool(layout.reused.any()):
            layout.focus = yield from question_focus(runner, cache, layout)
        return (yield from super().pass_steps(runner, cache, layout, observe))

    def check(self, cache: KVCache, layer: int, layout: Layout, active, k, v, chosen):
        """Select which active reused tokens run on. Returns (keep mask over active, chosen [R], gate count)."""
        cfg, step = self.cfg, layer - self.cfg.check_layer
        reused = layout.reused[active]
        idx = active[reused]  # rest indices of the reused tokens still active
        slots = layout.start + idx
        dev, rel = deviation(v[:, reused], cache.v[layer][:, slots])
        total = int(layout.reused.sum())
        fired = 0
        if step == 0:  # tokens recomputed whatever their deviation: the chunks the gate sends to full recompute
            layout.forced = torch.zeros_like(layout.reused)
            if cfg.gate is not None:
                layout.forced[idx], fired = gate(rel, layout.segment[idx], cfg.gate)
        forced = layout.forced[idx]
        budget = round(self.share_at(step) * total) - int(forced.sum())
        if layout.focus is not None:  # part of the budget goes to the tokens the question reads most
            n_focus = round(cfg.query_share * budget)
            forced = forced | top_share(layout.focus[idx].masked_fill(forced, float("-inf")), n_focus)
            budget -= n_focus
        pick = forced | top_share(dev.masked_fill(forced, float("-inf")), budget)
        chosen = torch.zeros_like(layout.reused)
        chosen[idx[pick]] = True
        if cfg.stale_bias and layer == self.last_check and bool(chosen.any()):  # tokens keeping their chunk KV
            stale = (layout.reused & ~chosen).nonzero().squeeze(1)
            cache.add_bias(layer, layout.start + stale, cfg.stale_bias)
        return ~reused | chosen[active], chosen, fired


class CacheBlendReuse(BlendReuse):
    """Plain CacheBlend, for comparison: the whole budget by KV deviation (``query_share`` = 0), stale KV
    attended as it is (``stale_bias`` = 0)."""

    name = "cacheblend"

    def __init__(self, cfg: BlendConfig | None = None, prefill_chunk: int = 512):
        super().__init__(replace(cfg or BlendConfig(), query_share=0.0, stale_bias=0.0), prefill_chunk)


def question_focus(runner: Runner, cache: KVCache, layout: Layout) -> Steps[torch.Tensor]:
    """How much the question attends to each reused token, from a naive probe: a :class:`NaiveReuse` pass
    (the computed tokens over the re-positioned chunk KV) whose queries after the last reused token (the
    question and the answer's glue) have their attention summed over heads, queries and layers.
    Returns [R] over the rest tokens (0 for computed ones).

    Writes the computed tokens' naive K/V into ``cache``; blend overwrites them in every layer before use.
    A generator of one pass (see :data:`kvstash.model.runner.Steps`).
    """
    rows = (~layout.reused).nonzero().squeeze(1)  # the rest tokens the probe computes, in order
    asks = rows > int(layout.reused.nonzero().max())  # [A] the question's rows among them
    focus = torch.zeros(cache.length)

    def observe(layer, q, k_all, mask) -> None:
        probs = attention_probs(q[:, asks], k_all, None if mask is None else mask[asks])  # [H, A, n]
        focus.add_(probs.sum(dim=(0, 1)))

    yield from NaiveReuse().pass_steps(runner, cache, layout, observe)
    return focus[layout.start :].masked_fill(~layout.reused, 0.0)
