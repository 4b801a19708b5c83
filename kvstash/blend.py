"""Reuse methods over the chunk store: ``prefix`` (exact), ``naive`` (re-positioned chunks, no recompute) and
``blend`` (CacheBlend-style selective recompute).

All three start the same way: the longest run of leading segments whose in-context KV is cached is loaded
exactly. ``prefix`` computes the rest in full. ``naive`` and ``blend`` lay the remaining reusable segments'
standalone chunk KV at their new positions (keys re-rotated) and compute the other segments (the question,
template glue) on top; ``blend`` also recomputes the reused tokens whose KV deviates most from what a full
prefill would give, chosen at a check layer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kvstash.chunks import ChunkSource, ChunkStats
from kvstash.evict import attention_probs
from kvstash.forward import Observer, Runner, biased_mask, causal_mask
from kvstash.kv import KVCache
from kvstash.layout import Layout, lay_out, lead_segments
from kvstash.prompt import PromptPlan
from kvstash.reuse import Prefilled, PrefillReport, ReuseMethod, SegmentReport, compute_tokens, register_method
from kvstash.selection import chunk_heads, deviation, gate, segment_means, top_share


def _require(chunks: ChunkSource | None, name: str) -> ChunkSource:
    if chunks is None:
        raise ValueError(f"reuse method {name!r} needs a chunk store; open the engine with a store")
    return chunks


def _prefix_limit(plan: PromptPlan) -> int:
    """Segments before the first user segment: the ones whose in-context KV is worth caching."""
    return next(i for i, s in enumerate(plan.segments) if s.kind == "user")


def _report(name: str, plan: PromptPlan, stats: ChunkStats) -> PrefillReport:
    r = PrefillReport(name, len(plan), load_s=stats.load_s, compute_s=stats.compute_s, store_s=stats.store_s)
    r.segments = [SegmentReport(s.kind, len(s.token_ids)) for s in plan.segments]
    r.tier_hits = stats.tier_hits
    return r


@register_method
class PrefixReuse(ReuseMethod):
    """Exact reuse of the cached leading segments; everything after them is computed (and cached)."""

    name = "prefix"

    def __init__(self, prefill_chunk: int = 512):
        self.prefill_chunk = prefill_chunk

    def prefill(self, runner: Runner, plan: PromptPlan, chunks: ChunkSource | None) -> Prefilled:
        chunks = _require(chunks, self.name)
        stats = ChunkStats()
        cache = runner.new_cache(len(plan) + 64)
        limit = _prefix_limit(plan)
        tiers = chunks.load_prefix(plan, cache, stats, limit)
        t = time.perf_counter()
        start = cache.length
        logits = compute_tokens(runner, cache, plan.token_ids[start:], start, self.prefill_chunk)
        stats.compute_s += time.perf_counter() - t
        chunks.save_prefix(plan, cache, len(tiers), limit, stats)
        report = _report(self.name, plan, stats)
        for i, seg in enumerate(report.segments):
            if i < len(tiers):
                seg.reused, seg.tier = seg.tokens, tiers[i]
            else:
                seg.recomputed = seg.tokens
        return Prefilled(cache, logits, report)


FOCUS_SCOPES = ("global", "chunk", "relative")
FOCUS_REDUCES = ("sum", "max")


@dataclass(frozen=True)
class BlendConfig:
    ratio: float = 0.15  # share of reused tokens recomputed in every layer after the last check layer
    check_layer: int = 1  # first layer where fresh and cached KV are compared (layers before it run in full)
    select_by: str = "value"  # deviation measured on: value | key | kv
    schedule: tuple[float, ...] = ()  # gradual filtering: shares kept at check_layer, check_layer+1, ...
    per_chunk: bool = False  # split the budget over chunks by size instead of one global top-k
    sink: int = 0  # always recompute the first ``sink`` tokens of every reused chunk
    head_context: bool = False  # chunk KV computed behind the prompt head (system prompt), not from 0
    gate: float | None = None  # recompute a whole chunk when its mean relative deviation exceeds this
    query_share: float = 0.75  # share of the budget for the tokens the question attends to (0: plain CacheBlend)
    focus_by_chunk: bool = False  # rank by each chunk's mean focus (recompute whole attended chunks) instead
    focus_pool: int = 0  # odd window: a token's focus is the max over its neighbours' (spans, not lone tokens)
    focus_from: int = 0  # the question's attention is summed from this layer on (earlier layers ignored)
    focus_reduce: str = "sum"  # sum: total attention over heads, queries, layers | max: the strongest single one
    stale_key_scale: float = 1.0  # keys of reused tokens not recomputed, after the last check layer, times this
    # (an attention temperature on the stale chunk KV, as in APE: > 1 sharpens, < 1 flattens)
    stale_bias: float = -0.25  # added to the attention logits of the reused tokens not recomputed, from the last
    # check layer on, in prefill and decoding (APE's scaling factor: their weight times e^stale_bias, ~0.78 here;
    # 0 turns it off). Only when something is recomputed: at r = 0 blend is naive reuse exactly
    focus_scope: str = "global"  # global: top focus over the prompt | chunk: top per chunk by size | relative:
    # focus divided by its chunk's mean, then global (the question's pull to the nearest chunk discounted)

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", tuple(float(x) for x in self.schedule))
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"blend ratio must be in [0, 1], got {self.ratio}")
        if self.check_layer < 0:
            raise ValueError(f"check_layer must be >= 0, got {self.check_layer}")
        if self.select_by not in ("value", "key", "kv"):
            raise ValueError(f"select_by must be value, key or kv, got {self.select_by!r}")
        shares = (*self.schedule, self.ratio)
        if any(b > a for a, b in zip(shares, shares[1:], strict=False)) or not all(0 <= x <= 1 for x in shares):
            raise ValueError(f"schedule must be shares in [0, 1] that never grow and end >= ratio, got {shares}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if not 0.0 <= self.query_share <= 1.0:
            raise ValueError(f"query_share must be in [0, 1], got {self.query_share}")
        if self.focus_pool < 0 or (self.focus_pool and self.focus_pool % 2 == 0):
            raise ValueError(f"focus_pool must be 0 (off) or an odd window of tokens, got {self.focus_pool}")
        if not math.isfinite(self.stale_bias):
            raise ValueError(f"stale_bias must be a finite logit offset, got {self.stale_bias}")
        if self.stale_key_scale <= 0:
            raise ValueError(f"stale_key_scale must be > 0, got {self.stale_key_scale}")
        if self.focus_reduce not in FOCUS_REDUCES:
            raise ValueError(f"focus_reduce must be one of {', '.join(FOCUS_REDUCES)}, got {self.focus_reduce!r}")
        if self.focus_scope not in FOCUS_SCOPES:
            raise ValueError(f"focus_scope must be one of {', '.join(FOCUS_SCOPES)}, got {self.focus_scope!r}")
        if self.focus_by_chunk and self.focus_scope != "global":
            raise ValueError("focus_by_chunk ranks whole chunks already; leave focus_scope at 'global' with it")
        if self.focus_from < 0:
            raise ValueError(f"focus_from must be a layer index >= 0, got {self.focus_from}")
        if self.gate is not None and self.gate <= 0:
            raise ValueError(f"gate must be a positive relative deviation, got {self.gate}")

    def share_at(self, step: int) -> float:
        """Share of reused tokens kept at the ``step``-th check layer (0 = check_layer)."""
        return self.schedule[step] if step < len(self.schedule) else self.ratio

    @property
    def last_check(self) -> int:
        return self.check_layer + len(self.schedule)


class _PartialPrefill(ReuseMethod):
    """Shared machinery for naive and blend: exact prefix, chunk layout, then a layer loop over the
    tokens being computed (``active``), attending over the merged cache by absolute position."""

    def __init__(self, cfg: BlendConfig | None = None, prefill_chunk: int = 512):
        self.cfg = cfg or BlendConfig()
        self.prefill_chunk = prefill_chunk

    def prefill(self, runner: Runner, plan: PromptPlan, chunks: ChunkSource | None) -> Prefilled:
        chunks = _require(chunks, self.name)
        stats = ChunkStats()
        cache = runner.new_cache(len(plan) + 64)
        tiers = chunks.load_prefix(plan, cache, stats, _prefix_limit(plan))
        report = _report(self.name, plan, stats)
        for i, tier in enumerate(tiers):
            report.segments[i].reused, report.segments[i].tier = report.segments[i].tokens, tier
        n_exact, lead = len(tiers), lead_segments(plan)
        if n_exact < lead:  # the shared head is not cached yet: compute it exactly and cache it in context
            t = time.perf_counter()
            compute_tokens(
                runner,
                cache,
                plan.token_ids[cache.length : plan.segments[lead].start],
                cache.length,
                self.prefill_chunk,
            )
            stats.compute_s += time.perf_counter() - t
            chunks.save_prefix(plan, cache, n_exact, lead, stats)
            for seg in report.segments[n_exact:lead]:
                seg.recomputed = seg.tokens
            n_exact = lead
        layout = lay_out(runner, plan, cache, chunks, n_exact, stats, report, self.cfg.head_context)
        t = time.perf_counter()
        logits, chosen, fired = self.run_layers(runner, cache, layout)
        stats.compute_s += time.perf_counter() - t
        for seg_idx in layout.segment[~layout.reused].unique().tolist():
            report.segments[seg_idx].recomputed = report.segments[seg_idx].tokens
        for seg_idx, n in zip(*layout.segment[chosen].unique(return_counts=True), strict=True):
            report.segments[int(seg_idx)].recomputed = int(n)
        report.load_s, report.compute_s, report.store_s = stats.load_s, stats.compute_s, stats.store_s
        report.tier_hits, report.gate_fired = stats.tier_hits, fired
        return Prefilled(cache, logits, report)

    def initial_active(self, layout: Layout) -> torch.Tensor:
        """Tokens (relative to layout.start) computed from layer 0."""
        return torch.ones_like(layout.reused)

    @torch.inference_mode()
    def run_layers(self, runner: Runner, cache: KVCache, layout: Layout, observer: Observer | None = None):
        """Returns (last-token logits [V], chosen [R] bool over all rest tokens, gate count). ``observer``, if
        given, sees each layer's queries of the computed tokens, all keys and the mask, as in ``Runner.forward``."""
        active = self.initial_active(layout).nonzero().squeeze(1)  # indices into the rest
        positions = torch.arange(layout.start, cache.length)
        cos_all, sin_all = runner.rope.cos_sin(positions)
        h = runner.embed(layout.ids[active])
        chosen = torch.zeros_like(layout.reused)
        fired = 0
        for layer in range(runner.num_layers):
            cos, sin = cos_all[active], sin_all[active]
            q, k, v = runner.qkv(layer, h, cos, sin)
            slots = layout.start + active
            if self.checks_at(layer):
                keep, chosen, fired_here = self.check(cache, layer, layout, active, k, v, chosen)
                fired += fired_here
                slots, q, k, v, h, active = slots[keep], q[:, keep], k[:, keep], v[:, keep], h[keep], active[keep]
            write = ~layout.reused[active] | chosen[active] | torch.tensor(layer < self.cfg.check_layer)
            cache.write_slots(layer, slots[write], k[:, write], v[:, write])
            k_all, v_all, k_pos = cache.layer(layer)
            mask = causal_mask(positions[active], k_pos[0])
            bias = cache.layer_bias(layer)  # [KVH, n]: blend's stale_bias, from its last check layer on
            bias = None if bias is None else bias[0]
            if observer is not None:
                observer(layer, q, k_all, mask if bias is None else biased_mask(mask, bias))
            h = runner.finish(layer, h, self.attend(runner, q, k_all, v_all, mask, bias))
        assert int(active[-1]) == len(layout.ids) - 1, "the prompt's last token must be computed"
        return runner.logits(h[-1:])[0], chosen, fired

    def attend(self, runner: Runner, q, k_all, v_all, mask, bias=None) -> torch.Tensor:
        """Attention in blocks of ``prefill_chunk`` queries; each block reads the keys up to the last one it may
        see (the keys after it are masked for every query of the block: leaving them out changes only the cost).
        mask: [Tq, n] bool; bias: [n] logit bias per key or None."""
        step, outs = self.prefill_chunk, []
        for s in range(0, q.shape[1], step):
            block = mask[s : s + step]  # [Tb, n]
            n = int(block.any(dim=0).nonzero().max()) + 1
            m = block[:, :n] if bias is None else biased_mask(block[:, :n], bias[:n])
            outs.append(runner.attend(q[:, s : s + step], k_all[:, :n], v_all[:, :n], m))
        return torch.cat(outs)

    def checks_at(self, layer: int) -> bool:
        return False

    def check(self, cache, layer, layout, active, k, v, chosen):
        raise NotImplementedError


@register_method
class NaiveReuse(_PartialPrefill):
    """Re-positioned chunk KV concatenated; only the segments without cached KV (question, glue) are computed."""

    name = "naive"

    def initial_active(self, layout: Layout) -> torch.Tensor:
        return ~layout.reused


@register_method
class BlendReuse(_PartialPrefill):
    """CacheBlend: all tokens run in full up to the check layer; there the reused tokens whose fresh KV
    deviates most from the cached KV are chosen, and only they (plus uncached segments) run on.

    Question-focused by default: a share ``query_share`` of the budget first goes to the reused tokens the
    question attends to most in a cheap naive probe (:func:`question_focus`); the rest by deviation. The
    reused tokens left stale then get ``stale_bias`` on their attention logits (a little less weight)."""

    name = "blend"

    def checks_at(self, layer: int) -> bool:
        return self.cfg.check_layer <= layer <= self.cfg.last_check

    def run_layers(self, runner: Runner, cache: KVCache, layout: Layout, observer: Observer | None = None):
        if self.cfg.query_share > 0 and self.cfg.ratio > 0 and bool(layout.reused.any()):
            layout.focus = question_focus(runner, cache, layout, self.cfg.focus_from, self.cfg.focus_reduce)
            if self.cfg.focus_pool > 1:
                layout.focus = pool_focus(layout.focus, layout.reused, self.cfg.focus_pool)
        if self.cfg.stale_key_scale != 1.0:  # recomputed tokens overwrite their scaled keys with fresh ones
            slots = layout.start + layout.reused.nonzero().squeeze(1)
            for layer in range(self.cfg.last_check + 1, runner.num_layers):
                cache.k[layer][:, slots] *= self.cfg.stale_key_scale
        return super().run_layers(runner, cache, layout, observer)

    def check(self, cache: KVCache, layer: int, layout: Layout, active, k, v, chosen):
        """Select which active reused tokens run on. Returns (keep mask over active, chosen [R], gate count)."""
        cfg, step = self.cfg, layer - self.cfg.check_layer
        reused = layout.reused[active]
        idx = active[reused]  # rest indices of the reused tokens still active
        slots = layout.start + idx
        dev, rel = deviation(
            k[:, reused], v[:, reused], cache.k[layer][:, slots], cache.v[layer][:, slots], cfg.select_by
        )
        seg = layout.segment[idx]
        total = int(layout.reused.sum())
        fired = 0
        if step == 0:  # tokens recomputed whatever their deviation: chunk heads (sinks), gated chunks
            layout.forced = torch.zeros_like(layout.reused)
            forced = chunk_heads(seg, cfg.sink)
            if cfg.gate is not None:
                gated, fired = gate(rel, seg, cfg.gate)
                forced |= gated
            layout.forced[idx] = forced
        forced = layout.forced[idx]
        budget = round(cfg.share_at(step) * total) - int(forced.sum())
        if layout.focus is not None:  # part of the budget goes to the tokens the question reads most
            n_focus = round(cfg.query_share * budget)
            focus = layout.focus[idx]
            if cfg.focus_by_chunk:  # every token scores its chunk's mean focus: whole chunks, most attended first
                focus = segment_means(focus, seg) + 1e-6 * focus  # ties inside a chunk broken by the token's own
            elif cfg.focus_scope == "relative":  # how far a token stands out in its own chunk
                focus = focus / segment_means(focus, seg).clamp_min(1e-12)
            split = seg if cfg.focus_scope == "chunk" else None  # each chunk gets its size's share of the budget
            forced = forced | top_share(focus.masked_fill(forced, float("-inf")), n_focus, split)
            budget -= n_focus
        pick = forced | top_share(dev.masked_fill(forced, float("-inf")), budget, seg if cfg.per_chunk else None)
        chosen = torch.zeros_like(layout.reused)
        chosen[idx[pick]] = True
        if cfg.stale_bias and layer == cfg.last_check and bool(chosen.any()):  # tokens keeping their chunk KV
            stale = (layout.reused & ~chosen).nonzero().squeeze(1)
            cache.add_bias(layer, layout.start + stale, cfg.stale_bias)
        return ~reused | chosen[active], chosen, fired


@register_method
class CacheBlendReuse(BlendReuse):
    """Plain CacheBlend, for comparison: the whole budget by KV deviation (``query_share`` = 0), stale KV
    attended as it is (``stale_bias`` = 0)."""

    name = "cacheblend"

    def __init__(self, cfg: BlendConfig | None = None, prefill_chunk: int = 512):
        super().__init__(replace(cfg or BlendConfig(), query_share=0.0, stale_bias=0.0), prefill_chunk)


def pool_focus(focus: torch.Tensor, reused: torch.Tensor, window: int) -> torch.Tensor:
    """Spread each token's focus over its neighbours: the max over an odd ``window`` centred on the token,
    plus a small share of the token's own focus to break ties. focus, reused: [R] -> [R] (0 where computed)."""
    spread = F.max_pool1d(focus[None, None], window, stride=1, padding=window // 2)[0, 0]  # [R]
    return (spread + 1e-3 * focus).masked_fill(~reused, 0.0)


@torch.inference_mode()
def question_focus(
    runner: Runner, cache: KVCache, layout: Layout, first_layer: int = 0, reduce: str = "sum"
) -> torch.Tensor:
    """How much the question attends to each reused token, from a naive probe: a :class:`NaiveReuse` pass
    (the computed tokens over the re-positioned chunk KV) whose queries after the last reused token (the
    question and the answer's glue) have their attention summed (``reduce="sum"``) or maxed (``"max"``) over
    heads, queries and the layers from ``first_layer`` on.
    Returns [R] over the rest tokens (0 for computed ones).

    Writes the computed tokens' naive K/V into ``cache``; blend overwrites them in every layer before use.
    """
    rows = (~layout.reused).nonzero().squeeze(1)  # the rest tokens the probe computes, in order
    asks = rows > int(layout.reused.nonzero().max())  # [A] the question's rows among them
    focus = torch.zeros(cache.length)

    if not 0 <= first_layer < runner.num_layers:
        raise ValueError(f"focus_from={first_layer}: the model has layers 0..{runner.num_layers - 1}")
    if reduce not in FOCUS_REDUCES:
        raise ValueError(f"reduce must be one of {', '.join(FOCUS_REDUCES)}, got {reduce!r}")

    def observe(layer, q, k_all, mask) -> None:
        if layer < first_layer:
            return
        probs = attention_probs(q[:, asks], k_all, mask[asks])  # [H, A, n]
        if reduce == "max":  # the strongest pull of any one head and query: sharp retrieval heads count fully
            torch.maximum(focus, probs.amax(dim=(0, 1)), out=focus)
        else:
            focus.add_(probs.sum(dim=(0, 1)))

    NaiveReuse().run_layers(runner, cache, layout, observe)
    return focus[layout.start :].masked_fill(~layout.reused, 0.0)
