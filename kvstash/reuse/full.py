"""``full``: no reuse, every token computed; the baseline every other method is measured against."""

from __future__ import annotations

import time

from kvstash.model.runner import Runner, Steps
from kvstash.prompt import PromptPlan
from kvstash.reuse.base import Prefilled, ReuseMethod
from kvstash.reuse.report import PrefillReport
from kvstash.reuse.source import ChunkSource


class FullPrefill(ReuseMethod):
    """No reuse: compute every token in chunks of ``prefill_chunk``."""

    name = "full"
    needs_store = False

    def prefill_steps(self, runner: Runner, plan: PromptPlan, chunks: ChunkSource | None = None) -> Steps[Prefilled]:
        t0 = time.perf_counter()
        cache = runner.new_cache(len(plan) + 64)
        logits = yield from runner.prefill_steps(cache, plan.token_ids, 0, self.prefill_chunk)
        report = PrefillReport.for_plan(self.name, plan)
        report.compute_s = time.perf_counter() - t0
        for seg in report.segments:
            seg.recomputed = seg.tokens
        return Prefilled(cache, logits, report)
