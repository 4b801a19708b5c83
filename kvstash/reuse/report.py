"""The accounting of one prefill: what each segment reused or recomputed, which tiers served it, and where the
time went. One object, filled in place by the chunk source, the layout and the reuse method."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
    blend_ratio: float | None = None  # share of the reused tokens blend chose to recompute (blend:auto's pick)
    tier_hits: dict[str, int] = field(default_factory=dict)  # chunk lookups served, per tier
    misses: int = 0  # chunk lookups no tier could serve (computed instead)
    kv_head_bits: list | None = None  # [layer][kv head] = [key bits, value bits] with --kv-alloc mixed
    # segment index -> offsets (within the segment) of the reused tokens blend chose to recompute, for the
    # segments recomputed in part only: a segment recomputed whole or not at all is told by its counts
    chosen: dict[int, list[int]] = field(default_factory=dict)
    # [prompt_tokens] attention the question paid each token in blend's probe (None: no probe ran)
    focus: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def for_plan(cls, method: str, plan: PromptPlan) -> PrefillReport:
        """An empty report with one row per segment of ``plan``."""
        segments = [SegmentReport(s.kind, len(s.token_ids)) for s in plan.segments]
        return cls(method, len(plan), segments)

    def hit(self, tier: str) -> None:
        self.tier_hits[tier] = self.tier_hits.get(tier, 0) + 1

    def recomputed_offsets(self, i: int) -> list[int]:
        """Offsets within segment ``i`` of the tokens computed in this request: every token of a segment
        computed whole (a missed chunk too), none of one reused as it was, blend's chosen ones of the rest."""
        row = self.segments[i]
        if row.recomputed >= row.tokens:
            return list(range(row.tokens))
        if row.recomputed == 0:
            return []
        offsets = self.chosen[i]
        assert len(offsets) == row.recomputed, f"segment {i}: {len(offsets)} chosen offsets, {row.recomputed} counted"
        return offsets

    @property
    def reused_tokens(self) -> int:
        return sum(s.reused for s in self.segments)

    @property
    def recomputed_tokens(self) -> int:
        return sum(s.recomputed for s in self.segments)

    @property
    def recomputed_ratio(self) -> float:
        return self.recomputed_tokens / max(1, self.prompt_tokens)
