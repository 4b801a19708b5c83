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


def spans(
    score: torch.Tensor,
    segment: torch.Tensor,
    count: int,
    width: int,
    limit: float = float("inf"),
    cost: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``count`` windows of up to ``2 * width + 1`` tokens of one segment with the most ``score`` [T] in total,
    taken one at a time, a window never overlapping one already taken, while what is taken stays within
    ``limit``: its count of tokens, or its summed ``cost`` [T] when given (as in :func:`within`). A token scoring
    -inf is never taken (nor a window centred on it); a window whose total is 0, or one that would pass
    ``limit``, ends the search. Segments are contiguous runs.

    score, segment: [T] -> bool [T]."""
    chosen = torch.zeros_like(score, dtype=torch.bool)
    if count <= 0 or score.numel() == 0:
        return chosen
    barred = score == float("-inf")
    finite = score.masked_fill(barred, 0.0).float()
    total = torch.empty_like(finite)
    for s in segment.unique():  # window totals within each segment
        run = (segment == s).nonzero().squeeze(1)
        lo, hi = int(run[0]), int(run[-1]) + 1
        sums = torch.nn.functional.pad(finite[lo:hi].cumsum(0), (1, 0))  # [n + 1]
        at = torch.arange(hi - lo)
        total[lo:hi] = sums[(at + width + 1).clamp(max=hi - lo)] - sums[(at - width).clamp(min=0)]
    total = total.masked_fill(barred, float("-inf"))
    weight = torch.ones_like(finite) if cost is None else cost.float()  # [T] what a token uses of the limit
    used = 0.0
    for _ in range(count):
        centre = int(total.argmax())
        if not total[centre] > 0:
            break
        window = torch.arange(max(0, centre - width), min(len(score), centre + width + 1))
        window = window[segment[window] == segment[centre]]
        window = window[~barred[window]]
        used += float(weight[window].sum())
        if used > limit + 1e-3:  # 1e-3: float sums
            break
        chosen[window] = True
        reach = torch.arange(max(0, int(window[0]) - width), min(len(score), int(window[-1]) + width + 1))
        total[reach] = float("-inf")  # a later window may not overlap this one
    return chosen
