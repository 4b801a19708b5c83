"""The rest of a prompt after its exact prefix, laid out for partial prefill: each reusable segment's standalone
chunk KV placed at its new positions (keys re-rotated), slots left for the segments to be computed."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvstash.cache.kv import KVCache
from kvstash.model.rope import reposition
from kvstash.model.runner import Runner, Steps
from kvstash.prompt import PromptPlan
from kvstash.reuse.loader import LayerLoader, Part
from kvstash.reuse.report import PrefillReport
from kvstash.reuse.source import ChunkSource
from kvstash.store.layers import LayerReader


def lead_segments(plan: PromptPlan) -> int:
    """Segments before the first document: the shared head (template glue, system prompt) that naive and
    blend compute exactly and cache in context rather than re-position."""
    return next(i for i, s in enumerate(plan.segments) if s.kind in ("document", "user"))


@dataclass
class Layout:
    """The prompt after its exact prefix: which tokens are reused chunk KV and which must be computed."""

    start: int  # slot/position of the first token after the exact prefix
    ids: torch.Tensor  # [R] token ids of the rest
    reused: torch.Tensor  # [R] bool: the token's KV came from a standalone chunk
    segment: torch.Tensor  # [R] int64: index into plan.segments
    forced: torch.Tensor | None = None  # [R] bool: set by blend's first check (sinks, gated chunks)
    focus: torch.Tensor | None = None  # [R] float: attention the question pays each token (blend's probe)
    peak: torch.Tensor | None = None  # [R] float: the largest single attention weight the probe pays each token
    cost: torch.Tensor | None = None  # [R] float: each token's recompute cost (blend's budget="work"); None: 1
    ratio: float | None = None  # share of the reused tokens blend recomputes (set at its first check)
    loader: LayerLoader | None = None  # stored chunks still arriving layer by layer (a layered store)

    def wait(self, layer: int) -> None:
        """Before a pass reads ``layer``'s cached KV: wait until every stored chunk's layer is in place."""
        if self.loader is not None:
            self.loader.wait(layer)

    def finish(self, report: PrefillReport) -> None:
        """Once the pass is over: every layer loaded; the time the pass waited counts as load time."""
        if self.loader is not None:
            self.loader.finish()
            report.load_s += self.loader.wait_s
            self.loader = None


def lay_out(
    runner: Runner,
    plan: PromptPlan,
    cache: KVCache,
    chunks: ChunkSource,
    n_prefix: int,
    report: PrefillReport,
) -> Steps[Layout]:
    """Append the rest of the prompt to ``cache``: reusable segments get their standalone chunk KV with keys
    re-positioned; other segments get slots to be computed. Fills per-segment tiers and reuse in ``report``."""
    rest = list(enumerate(plan.segments))[n_prefix:]
    reusable = [(i, s) for i, s in rest if s.reusable]
    found = yield from chunks.standalone([s for _, s in reusable], report, layered=chunks.layered)
    lookups = dict(zip((i for i, _ in reusable), found, strict=True))
    start = cache.length
    t = time.perf_counter()
    cache.append(torch.arange(start, len(plan)))
    ids, reused, segment, parts = [], [], [], []
    for i, seg in rest:
        n = len(seg.token_ids)
        ids += seg.token_ids
        segment += [i] * n
        hit = lookups.get(i)
        reused += [hit is not None] * n
        if hit is None:
            continue
        if isinstance(hit, LayerReader):  # its layers arrive while the pass runs
            parts.append(Part(i, seg.start, hit))
            report.segments[i].tier, report.segments[i].reused = hit.tier, n
            continue
        new_pos = torch.arange(seg.start, seg.end)
        reposition(hit.chunk.keys, hit.chunk.positions, new_pos, runner.rope, out=cache.k[:, :, seg.start : seg.end])
        cache.v[:, :, seg.start : seg.end] = hit.chunk.values  # cast to the cache's dtype on the copy
        rep = report.segments[i]
        rep.tier = hit.tier
        if hit.tier is None:  # a miss: computed standalone in this request
            rep.recomputed = n
        else:
            rep.reused = n
    report.load_s += time.perf_counter() - t
    layout = Layout(start, torch.tensor(ids), torch.tensor(reused), torch.tensor(segment))
    if parts:
        layout.loader = LayerLoader(cache, parts, runner.rope, chunks.recompute, report).start()
    return layout
