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
from kvstash.model.runner import LayerHook, Rows, Runner, Selection, Steps
from kvstash.reuse.layout import Layout
from kvstash.reuse.partial import PartialPrefill
from kvstash.reuse.selection import deviation, gate, spans, within

DEFAULT_RATIO = 0.15
AUTO_DEVIATION = 0.06  # blend:auto's threshold on a reused token's relative value deviation at the check layer
AUTO_MAX = 0.3  # blend:auto's ratio cap (the ``ratio`` field when ``auto`` is set)
FOCUS = ("probe", "recent")  # BlendConfig.focus: what the question-focused share of the budget follows
BUDGETS = ("tokens", "work")  # BlendConfig.budget: what the ratio is a share of
SPANS = 3  # windows around the probe's strongest reads that blend recomputes by default (BlendConfig.spans)


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
    probe_layers: int | None = None  # layers the question's naive probe runs through (None: all of them)
    # where the question-focused share of the budget goes: "probe", the reused tokens the question attends to
    # most in a naive probe pass; "recent", the reused tokens nearest the question (no probe pass)
    focus: str = "probe"
    # what ``ratio`` is a share of: "tokens", the reused tokens (each counts 1); "work", their cost through the
    # partial layers (linear layers plus attention over the keys before them, :meth:`Runner.position_costs`), so a token
    # late in the prompt uses more of the budget than an early one
    budget: str = "tokens"
    # blend:auto: the ratio per prompt is the share of reused tokens whose relative value deviation at the
    # check layer exceeds ``auto``, kept within [auto_min, ratio]; None: the fixed ``ratio``
    auto: float | None = None
    auto_min: float = 0.03
    # force ``spans`` windows of 2 * span_width + 1 reused tokens (a sentence or so) into the recompute, inside the
    # budget: those around the probe's strongest single reads (a token's peak is the most attention any one
    # layer, head and question row of the probe pays it); 0: none. None: SPANS with the question-focused probe
    # (focus="probe", query_share > 0), else 0
    spans: int | None = None
    span_width: int = 8

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
        if self.auto is not None and not (self.auto > 0 and 0.0 <= self.auto_min <= self.ratio):
            raise ValueError(
                f"blend:auto needs a positive deviation threshold and 0 <= auto_min <= ratio (the cap); got "
                f"auto={self.auto}, auto_min={self.auto_min}, ratio={self.ratio}"
            )
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if self.focus not in FOCUS:
            raise ValueError(f"focus must be one of {', '.join(FOCUS)}, got {self.focus!r}")
        if self.spans is None:  # frozen: the default resolved once, here
            object.__setattr__(self, "spans", SPANS if self.focus == "probe" and self.query_share > 0 else 0)
        if self.spans < 0 or self.span_width < 0:
            raise ValueError(f"spans and span_width must be >= 0, got spans={self.spans}, span_width={self.span_width}")
        if self.spans and self.focus != "probe":
            raise ValueError(
                f"spans follow the probe's strongest reads: use focus='probe', or spans=0 with focus={self.focus!r}"
            )
        if self.probe_layers is not None and self.probe_layers < 1:
            raise ValueError(f"probe_layers must be >= 1 (or None for every layer), got {self.probe_layers}")


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
        yield from self.focus_steps(runner, cache, layout)
        return (yield from super().pass_steps(runner, cache, layout, observe))

    def focus_steps(self, runner: Runner, cache: KVCache, layout: Layout) -> Steps[None]:
        """What the check needs before the pass: each token's cost (``budget="work"``), and the question's focus
        and peaks (the probe pass) or its recency focus."""
        if self.cfg.budget == "work":
            layout.cost = runner.position_costs(torch.arange(layout.start, layout.start + len(layout.ids)))
        if (self.cfg.query_share > 0 or self.cfg.spans) and self.cfg.ratio > 0 and bool(layout.reused.any()):
            if self.cfg.focus == "recent":
                layout.focus = recency_focus(layout.reused)
            else:
                layout.focus, layout.peak = yield from question_focus(runner, cache, layout, self.cfg.probe_layers)

    def check(self, cache: KVCache, layer: int, layout: Layout, active, k, v, chosen):
        """Select which active reused tokens run on. Returns (keep mask over active, chosen [R], gate count)."""
        cfg, step = self.cfg, layer - self.cfg.check_layer
        reused = layout.reused[active]
        idx = active[reused]  # rest indices of the reused tokens still active
        slots = layout.start + idx
        dev, rel = deviation(v[:, reused], cache.v[layer][:, slots])
        total = int(layout.reused.sum())
        fired = 0
        if step == 0:
            layout.ratio = self.share_at(0) if cfg.auto is None else auto_ratio(rel, total, cfg)
            layout.forced, fired = self.forced(layout, idx, rel)
        forced = layout.forced[idx]
        share = layout.ratio if step == 0 else self.share_at(step)
        cost = None if layout.cost is None else layout.cost[idx]
        if cost is None:
            budget = round(share * total) - int(forced.sum())
        else:
            budget = share * float(layout.cost[layout.reused].sum()) - float(cost[forced].sum())
        if layout.focus is not None:  # part of the budget goes to the tokens the question reads most
            focused = cfg.query_share * budget
            focused = round(focused) if cost is None else focused
            took = within(layout.focus[idx].masked_fill(forced, float("-inf")), focused, cost)
            forced = forced | took
            budget -= focused if cost is None else float(cost[took].sum())  # work: what the focus left goes on
        pick = forced | within(dev.masked_fill(forced, float("-inf")), budget, cost)
        chosen = torch.zeros_like(layout.reused)
        chosen[idx[pick]] = True
        if cfg.stale_bias and layer == self.last_check and bool(chosen.any()):  # tokens keeping their chunk KV
            stale = (layout.reused & ~chosen).nonzero().squeeze(1)
            cache.add_bias(layer, layout.start + stale, cfg.stale_bias)
        return ~reused | chosen[active], chosen, fired

    def forced(self, layout: Layout, idx: torch.Tensor, rel: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The reused tokens recomputed whatever their scores, [R] bool, inside the budget (the chunks the gate
        sends to full recompute, the ``spans`` windows that fit in the ratio's budget, in tokens or in work; a study
        may force others),
        and how many chunks the gate fired for. Runs once, at the first check, after ``layout.ratio`` is set. idx: [A]
        rest indices of the active reused tokens; rel: [A] their relative deviation at the check layer."""
        forced, fired = torch.zeros_like(layout.reused), 0
        if self.cfg.gate is not None:
            forced[idx], fired = gate(rel, layout.segment[idx], self.cfg.gate)
        if self.cfg.spans and layout.peak is not None:  # as many windows as the budget holds
            score = layout.peak.masked_fill(~layout.reused, float("-inf"))
            cost = layout.cost  # budget="work": windows counted in work, as the rest of the budget is
            if cost is None:
                limit = layout.ratio * int(layout.reused.sum()) - int(forced.sum())
            else:
                limit = layout.ratio * float(cost[layout.reused].sum()) - float(cost[forced].sum())
            forced |= spans(score, layout.segment, self.cfg.spans, self.cfg.span_width, limit, cost)
        return forced, fired


def auto_ratio(rel: torch.Tensor, total: int, cfg: BlendConfig) -> float:
    """blend:auto's budget: the share of the ``total`` reused tokens whose relative deviation ``rel`` [T] exceeds
    ``cfg.auto``, within [cfg.auto_min, cfg.ratio]. A prompt whose chunks barely changed in context recomputes
    little; one whose chunks read each other a lot recomputes more."""
    share = int((rel > cfg.auto).sum()) / max(1, total)
    return min(cfg.ratio, max(cfg.auto_min, share))


class CacheBlendReuse(BlendReuse):
    """Plain CacheBlend, for comparison: the whole budget by KV deviation (``query_share`` = 0, no ``spans``),
    stale KV attended as it is (``stale_bias`` = 0)."""

    name = "cacheblend"

    def __init__(self, cfg: BlendConfig | None = None, prefill_chunk: int = 512):
        super().__init__(replace(cfg or BlendConfig(), query_share=0.0, stale_bias=0.0, spans=0), prefill_chunk)


def recency_focus(reused: torch.Tensor) -> torch.Tensor:
    """``focus="recent"``: each reused token's focus is its place in the prompt, so the focused share of the
    budget goes to the reused tokens nearest the question. reused: [R] bool -> [R] float (0 for computed ones)."""
    return torch.arange(1, len(reused) + 1, dtype=torch.float32).masked_fill(~reused, 0.0)


def question_focus(
    runner: Runner, cache: KVCache, layout: Layout, layers: int | None = None
) -> Steps[tuple[torch.Tensor, torch.Tensor]]:
    """How much the question attends to each reused token, from a naive probe: the computed tokens (the question
    and the template's glue) over the re-positioned chunk KV, through the first ``layers`` layers (None: all);
    the attention of the rows after the last reused token (the question and the answer's glue) summed over
    heads, rows and layers (the focus), and its largest single weight over them (the peak). Returns (focus,
    peak), each [R] over the rest tokens (0 for computed ones).

    Writes the computed tokens' naive K/V into ``cache``; blend overwrites them in every layer before use.
    A generator of one pass (see :data:`kvstash.model.runner.Steps`).
    """
    probe = FocusProbe(cache, layout, runner.num_layers if layers is None else min(layers, runner.num_layers))
    yield [probe.rows()]
    rest = slice(layout.start, None)
    return probe.focus[rest].masked_fill(~layout.reused, 0.0), probe.peak[rest].masked_fill(~layout.reused, 0.0)


class FocusProbe(LayerHook):
    """The probe's layer hook: its rows leave the pass after ``layers`` layers; at each layer before that the
    question rows' attention weights (scores in the cache's dtype, softmax in float32) add into ``focus`` [n],
    and ``peak`` [n] keeps the largest of them."""

    def __init__(self, cache: KVCache, layout: Layout, layers: int):
        self.cache, self.layout, self.layers = cache, layout, layers
        self.idx = (~layout.reused).nonzero().squeeze(1)  # [C] the rest tokens the probe computes, in order
        self.asks = self.idx > int(layout.reused.nonzero().max())  # [C] the question's rows among them
        self.focus = torch.zeros(cache.length)
        self.peak = torch.zeros(cache.length)

    def rows(self) -> Rows:
        start, idx = self.layout.start, self.idx
        return Rows(self.layout.ids[idx], start + idx, self.cache, start + idx, hook=self)

    def select(self, layer: int, q, k, v) -> Selection | None:
        if layer < self.layers:
            self.layout.wait(layer)
            return None
        return Selection(keep=torch.zeros(q.shape[1], dtype=torch.bool))  # done: the rest of the pass is empty

    def observe(self, layer: int, q, k_all, mask) -> None:
        m = None if mask is None else mask[self.asks]
        probs = attention_probs(q[:, self.asks], k_all, m, compute_dtype=k_all.dtype)  # [H, Q, n]
        self.focus.add_(probs.sum(dim=(0, 1)))
        torch.maximum(self.peak, probs.amax(dim=(0, 1)), out=self.peak)
