"""``prefix``: exact reuse of the cached leading segments; and the exact head every partial method starts from.

All reuse methods over the store begin the same way: the longest run of leading segments whose in-context
KV is cached is loaded exactly. ``prefix`` computes the rest in full (and caches it in context); ``naive`` and
``blend`` compute the shared head (template glue, system prompt) exactly if it was not cached, then lay the
documents out from their standalone chunk KV (:mod:`kvstash.reuse.layout`).
"""

from __future__ import annotations

import time

import torch

from kvstash.cache.kv import KVCache
from kvstash.model.runner import Runner, Steps
from kvstash.prompt import PromptPlan
from kvstash.reuse.base import Prefilled, ReuseMethod
from kvstash.reuse.layout import lead_segments
from kvstash.reuse.report import PrefillReport
from kvstash.reuse.source import ChunkSource


def prefix_limit(plan: PromptPlan) -> int:
    """Segments before the first user segment: the ones whose in-context KV is worth caching."""
    return next(i for i, s in enumerate(plan.segments) if s.kind == "user")


def compute_exact(
    runner: Runner, plan: PromptPlan, cache: KVCache, upto: int, report: PrefillReport, chunk: int
) -> Steps[torch.Tensor]:
    """Compute the prompt's tokens from ``cache.length`` to ``upto`` in full onto ``cache``, timing it into
    ``report`` and marking every segment that starts there recomputed. Returns the last token's logits."""
    t = time.perf_counter()
    first = cache.length
    logits = yield from runner.prefill_steps(cache, plan.token_ids[first:upto], first, chunk)
    report.compute_s += time.perf_counter() - t
    for seg, row in zip(plan.segments, report.segments, strict=True):
        if first <= seg.start < upto:
            row.recomputed = row.tokens
    return logits


def exact_head(
    runner: Runner, plan: PromptPlan, cache: KVCache, chunks: ChunkSource, report: PrefillReport, chunk: int
) -> Steps[int]:
    """Fill ``cache`` with the prompt's exact head: the cached leading segments, and the shared head (the
    segments before the first document) computed and cached in context if the store lacked it. Returns how
    many leading segments the cache now holds exactly."""
    n_exact, lead = chunks.load_prefix(plan, cache, report, prefix_limit(plan)), lead_segments(plan)
    if n_exact < lead:  # the shared head is not cached yet: compute it exactly and cache it in context
        yield from compute_exact(runner, plan, cache, plan.segments[lead].start, report, chunk)
        chunks.save_prefix(plan, cache, n_exact, lead, report)
        n_exact = lead
    return n_exact


class PrefixReuse(ReuseMethod):
    """Exact reuse of the cached leading segments; everything after them is computed (and cached)."""

    name = "prefix"

    def prefill_steps(self, runner: Runner, plan: PromptPlan, chunks: ChunkSource | None) -> Steps[Prefilled]:
        chunks = self.source(chunks)
        report = PrefillReport.for_plan(self.name, plan)
        cache = runner.new_cache(len(plan) + 64)
        limit = prefix_limit(plan)
        loaded = chunks.load_prefix(plan, cache, report, limit)
        logits = yield from compute_exact(runner, plan, cache, len(plan), report, self.prefill_chunk)
        chunks.save_prefix(plan, cache, loaded, limit, report)
        return Prefilled(cache, logits, report)
