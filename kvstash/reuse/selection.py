"""Token selection for blending: how far each reused token's fresh KV is from its cached KV, and which
tokens to recompute. Pure functions over tensors."""

from __future__ import annotations

import torch


def deviation(fresh: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token deviation of fresh from cached values (or keys) at one layer.

    fresh, old: [KVH, T, D] -> (absolute L2 distance [T], distance relative to the fresh norm [T]).
    """
    diff = (fresh - old).float().pow(2).sum(dim=(0, 2))
    norm = fresh.float().pow(2).sum(dim=(0, 2))
    return diff.sqrt(), (diff / norm.clamp_min(1e-12)).sqrt()


def top_share(score: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` highest scores [T] (none when ``count`` <= 0)."""
    chosen = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        chosen[torch.topk(score, min(count, score.numel())).indices] = True
    return chosen


def gate(rel: torch.Tensor, segment: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """Quality gate: every token of a segment whose mean relative deviation exceeds ``threshold``.

    rel, segment: [T] -> (bool [T], number of segments that fired).
    """
    chosen = torch.zeros_like(rel, dtype=torch.bool)
    fired = 0
    for s in segment.unique():
        m = segment == s
        if rel[m].mean() > threshold:
            chosen |= m
            fired += 1
    return chosen, fired


def within(score: torch.Tensor, budget: float, cost: torch.Tensor | None) -> torch.Tensor:
    """The highest ``score`` [T] tokens that fit in ``budget``: its count when ``cost`` is None, else the tokens
    taken in score order while their summed ``cost`` [T] stays within it (-inf scores are never taken)."""
    if cost is None:
        return top_share(score, int(budget))
    order = score.argsort(descending=True)
    fits = (cost[order].cumsum(0) <= budget + 1e-3) & (score[order] > float("-inf"))  # 1e-3: float sums
    chosen = torch.zeros_like(score, dtype=torch.bool)
    chosen[order[fits]] = True
    return chosen
