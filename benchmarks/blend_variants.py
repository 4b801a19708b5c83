"""Blend variants still under study, beside the study that measures them (not product options).

``GradualBlend``: gradual filtering (CacheBlend's own schedule), keeping a larger share of the reused tokens
through the first check layers and narrowing to ``ratio`` after them. Measured in docs/benchmarks.md ("gradual
filtering"): +2 needles of 50 on needle-code with the question focus, but a higher KL on musique and a TTFT
under 3.5x on one seed, so it is not the default. Variants the studies showed to be worse (key deviation,
per-chunk budgets, chunk sinks, head context, pooled / chunk / relative / max focus, focus from a later layer,
a temperature on stale keys) were deleted; their numbers stay in docs/benchmarks.md.
"""

from __future__ import annotations

from kvstash.reuse.blend import BlendConfig, BlendReuse


class GradualBlend(BlendReuse):
    """``blend`` whose share of recomputed reused tokens narrows over several check layers: ``schedule[i]`` at
    ``check_layer + i``, then ``cfg.ratio`` from ``check_layer + len(schedule)`` on."""

    name = "blend-gradual"

    def __init__(self, cfg: BlendConfig, schedule: tuple[float, ...], prefill_chunk: int = 512):
        super().__init__(cfg, prefill_chunk)
        shares = (*schedule, cfg.ratio)
        if any(b > a for a, b in zip(shares, shares[1:], strict=False)) or not all(0 <= x <= 1 for x in shares):
            raise ValueError(f"schedule must be shares in [0, 1] that never grow and end >= ratio, got {shares}")
        self.schedule = tuple(schedule)

    @property
    def last_check(self) -> int:
        return self.cfg.check_layer + len(self.schedule)

    def checks_at(self, layer: int) -> bool:
        return self.cfg.check_layer <= layer <= self.last_check

    def share_at(self, step: int) -> float:
        return self.schedule[step] if step < len(self.schedule) else self.cfg.ratio
