"""Token selection for blending: how far each reused token's fresh KV is from its cached KV, and which
tokens to recompute. Pure functions over tensors."""

from __future__ import annotations

import torch


def deviation(fresh_k, fresh_v, old_k, old_v, select_by: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token deviation of fresh from cached KV at one layer.

    fresh_k, fresh_v, old_k, old_v: [KVH, T, D] -> (absolute L2 distance [T], distance relative to the fresh
    norm [T]). ``select_by``: value | key | kv (both, summed).
    """
    pairs = {"value": [(fresh_v, old_v)], "key": [(fresh_k, old_k)], "kv": [(fresh_k, old_k), (fresh_v, old_v)]}
    diff = torch.zeros(fresh_k.shape[1])
    norm = torch.zeros(fresh_k.shape[1])
    for fresh, old in pairs[select_by]:
        diff += (fresh - old).float().pow(2).sum(dim=(0, 2))
        norm += fresh.float().pow(2).sum(dim=(0, 2))
    return diff.sqrt(), (diff / norm.clamp_min(1e-12)).sqrt()


def top_share(score: torch.Tensor, count: int, segment: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the ``count`` highest scores [T]; with ``segment`` [T], the budget is split over the
    segments in proportion to their sizes (each chunk gets its share), else it is global."""
    chosen = torch.zeros_like(score, dtype=torch.bool)
    if count <= 0:
        return chosen
    if segment is None:
        chosen[torch.topk(score, min(count, score.numel())).indices] = True
        return chosen
    share = count / score.numel()
    for s in segment.unique():
        idx = (segment == s).nonzero().squeeze(1)
        k = min(idx.numel(), round(share * idx.numel()))
        if k:
            chosen[idx[torch.topk(score[idx], k).indices]] = True
    return chosen


def segment_means(score: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Each token's segment mean of ``score``. score: [T] float, segment: [T] int64 -> [T]."""
    sums = torch.zeros(int(segment.max()) + 1).index_add_(0, segment, score.float())
    means = sums / torch.bincount(segment, minlength=sums.numel()).clamp_min(1)
    return means[segment]


def chunk_heads(segment: torch.Tensor, n: int) -> torch.Tensor:
    """Mask of the first ``n`` tokens of every segment run. segment: [T] (runs of equal ids) -> [T] bool."""
    if n <= 0:
        return torch.zeros_like(segment, dtype=torch.bool)
    starts = torch.ones_like(segment, dtype=torch.bool)
    starts[1:] = segment[1:] != segment[:-1]
    idx = torch.arange(segment.numel())
    run_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 0).values
    return idx - run_start < n


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
