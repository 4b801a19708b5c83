"""Partial prefill over re-positioned chunk KV: the shared machinery of ``naive`` and ``blend``, and ``naive``.

After the exact head, the documents' standalone chunk KV is laid out at their new positions
(:func:`kvstash.reuse.layout.lay_out`) and one pass of the runner's layer loop computes the tokens that are
*active*: the segments with no cached KV (question, template glue) and, for blend, the reused tokens it
chooses. The pass attends over the merged cache by absolute position; its hook (:class:`PartialPass`) keeps
track of which tokens are still active and which of them write their K/V.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kvstash.cache.kv import KVCache
from kvstash.model.runner import LayerHook, Rows, Runner, Selection, Steps
from kvstash.prompt import PromptPlan
from kvstash.reuse.base import Prefilled, ReuseMethod
from kvstash.reuse.layout import Layout, lay_out
from kvstash.reuse.prefix import exact_head
from kvstash.reuse.report import PrefillReport
from kvstash.reuse.source import ChunkSource

# observe(layer, q [H, T, D], k [KVH, n, D], mask): the pass's queries and every cached key, per layer
Observe = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


class PartialPass(LayerHook):
    """The layer hook of a partial prefill: which rest tokens are active (``active``, indices into the
    layout), which reused ones the method chose to recompute (``chosen``), and which write their K/V.
    A method that selects tokens overrides :meth:`PartialPrefill.checks_at` and :meth:`PartialPrefill.check`."""

    def __init__(self, method: PartialPrefill, cache: KVCache, layout: Layout, observe: Observe | None = None):
        self.method, self.cache, self.layout, self.observe_fn = method, cache, layout, observe
        self.active = method.initial_active(layout).nonzero().squeeze(1)  # [A] indices into the rest
        self.chosen = torch.zeros_like(layout.reused)  # [R] reused tokens recomputed after the last check
        self.fired = 0  # chunks the quality gate sent to full recompute

    def rows(self) -> Rows:
        lay = self.layout
        positions = torch.arange(lay.start, lay.start + len(lay.ids))
        return Rows(lay.ids[self.active], positions[self.active], self.cache, lay.start + self.active, hook=self)

    def select(self, layer: int, q, k, v) -> Selection:
        self.layout.wait(layer)  # stored chunks' KV of this layer in place (a layered store)
        keep = None
        if self.method.checks_at(layer):
            keep, self.chosen, fired = self.method.check(self.cache, layer, self.layout, self.active, k, v, self.chosen)
            self.fired += fired
            self.active = self.active[keep]
        reused = self.layout.reused[self.active]
        write = ~reused | self.chosen[self.active] | (layer < self.method.first_check)
        return Selection(keep, write)

    def observe(self, layer: int, q, k, mask) -> None:
        if self.observe_fn is not None:
            self.observe_fn(layer, q, k, mask)


class PartialPrefill(ReuseMethod):
    """Exact head, chunk layout, then one partial pass (see the module docstring)."""

    first_check = 0  # layers before it write every active token's K/V (blend: its check layer)

    def prefill_steps(self, runner: Runner, plan: PromptPlan, chunks: ChunkSource | None) -> Steps[Prefilled]:
        chunks = self.source(chunks)
        report = PrefillReport.for_plan(self.name, plan)
        cache = runner.new_cache(len(plan) + 64)
        n_exact = yield from exact_head(runner, plan, cache, chunks, report, self.prefill_chunk)
        layout = yield from lay_out(runner, plan, cache, chunks, n_exact, report)
        t, load_s = time.perf_counter(), report.load_s
        try:
            logits, chosen, fired = yield from self.pass_steps(runner, cache, layout)
        finally:
            layout.finish(report)
        report.compute_s += time.perf_counter() - t - (report.load_s - load_s)
        for seg_idx in layout.segment[~layout.reused].unique().tolist():
            report.segments[seg_idx].recomputed = report.segments[seg_idx].tokens
        _count_chosen(plan, layout, chosen, report)
        report.gate_fired, report.blend_ratio = fired, layout.ratio
        return Prefilled(cache, logits, report)

    def initial_active(self, layout: Layout) -> torch.Tensor:
        """[R] bool: the rest tokens computed from layer 0."""
        return torch.ones_like(layout.reused)

    def pass_steps(self, runner: Runner, cache: KVCache, layout: Layout, observe: Observe | None = None) -> Steps:
        """One partial pass, as steps. Returns (last-token logits [V], chosen [R] bool over the rest tokens, gate
        count). ``observe``, if given, sees each layer's queries of the active tokens, every key and the mask."""
        hook = PartialPass(self, cache, layout, observe)
        rows = hook.rows()
        lead = min(self.first_check, runner.num_layers)
        if lead and observe is None and len(rows.positions) > self.prefill_chunk:
            rows.h = yield from lead_layers(rows, lead, layout, self.prefill_chunk)
            rows.first = lead
        (h,) = yield [rows]
        assert int(hook.active[-1]) == len(layout.ids) - 1, "the prompt's last token must be computed"
        return runner.logits(h[-1:])[0], hook.chosen, hook.fired

    def checks_at(self, layer: int) -> bool:
        return False

    def check(self, cache, layer, layout, active, k, v, chosen):
        """(keep [A] bool over the active tokens, chosen [R], gate count) at a check layer."""
        raise NotImplementedError


class NaiveReuse(PartialPrefill):
    """Re-positioned chunk KV concatenated; only the segments without cached KV (question, glue) are computed."""

    name = "naive"

    def initial_active(self, layout: Layout) -> torch.Tensor:
        return ~layout.reused


class _Lead(LayerHook):
    """The hook of the layers before the first check: the stored chunks' KV of a layer is in place before the
    recomputed K/V overwrite it, and every row writes."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def select(self, layer: int, q, k, v) -> Selection | None:
        self.layout.wait(layer)
        return None


def lead_layers(rows: Rows, layers: int, layout: Layout, chunk: int) -> Steps[torch.Tensor]:
    """``rows`` (a partial pass's, every one active) through layers [0, ``layers``) in passes of ``chunk``
    tokens, in order: as in chunked prefill, a chunk attends to itself and to the chunks before it, whose K/V
    of these layers are already recomputed, and the keys after it are hidden by position. So the layers every
    token runs (blend's, before its check layer) are not one pass over the whole prompt, which no step budget
    could cut below a layer. Returns the hidden states [T, hidden] after layer ``layers - 1``."""
    hook, outs = _Lead(layout), []
    for s in range(0, len(rows.positions), chunk):
        part = Rows(rows.ids[s : s + chunk], rows.positions[s : s + chunk], rows.cache, rows.slots[s : s + chunk])
        part.hook, part.last = hook, layers
        (h,) = yield [part]
        outs.append(h)
    return torch.cat(outs)


def _count_chosen(plan: PromptPlan, layout: Layout, chosen: torch.Tensor, report: PrefillReport) -> None:
    """Count the reused tokens the pass recomputed per segment, keep their offsets where a segment was recomputed
    in part, and keep the question's focus (blend's probe) over the whole prompt."""
    idx = chosen.nonzero().squeeze(1)  # [C] rest indices of the chosen tokens
    segs = layout.segment[idx]
    for seg_idx in segs.unique().tolist():
        positions = layout.start + idx[segs == seg_idx]
        row = report.segments[seg_idx]  # a chunk computed standalone just now counts whole
        row.recomputed = max(row.recomputed, len(positions))
        if row.recomputed < row.tokens:
            report.chosen[seg_idx] = (positions - plan.segments[seg_idx].start).tolist()
    if layout.focus is not None:
        report.focus = torch.cat([torch.zeros(layout.start), layout.focus])
