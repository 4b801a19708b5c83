"""Attention math as pure functions: the one mask builder, the fused kernel's call, softmax weights, value reads
and votes.

The layer loop (:mod:`kvstash.model.runner`) attends through :func:`sdpa` (PyTorch's fused kernel); the other
functions spell the same attention out in float32 for the callers that need the weights themselves (eviction
votes, bit allocation, blend's question focus, query replay).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask by absolute position: a query sees keys at its own or earlier positions.

    q_pos: [Tq]; k_pos: [n] or [KVH, n] -> [Tq, n] or [KVH, Tq, n] (True = attend).
    """
    return k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)


def biased_mask(mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A boolean mask as an additive float mask carrying a per-key logit bias (``KVCache.bias``).

    mask: [Tq, n] or [KVH, Tq, n]; bias: [n] or [KVH, n] -> float32, -inf where ``mask`` is False.
    """
    return bias.unsqueeze(-2).expand(mask.shape).masked_fill(~mask, float("-inf"))


def attention_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, bias: torch.Tensor | None, uniform: bool
) -> torch.Tensor | None:
    """The mask of queries at ``q_pos`` [Tq] over one layer's cached keys: causal by position, carrying the
    cache's logit bias when it has one. k_pos, bias: [KVH, n] (bias may be None); ``uniform``: every KV head
    holds the same positions, so one [Tq, n] mask serves them all (else [KVH, Tq, n]).

    Returns a boolean mask (True = attend), a float mask when biased, or None when every key is visible
    and unbiased.
    """
    if uniform:
        k_pos, bias = k_pos[0], None if bias is None else bias[0]
    mask = causal_mask(q_pos, k_pos)
    if bias is not None:
        return biased_mask(mask, bias)
    return None if bool(mask.all()) else mask


def visible_keys(mask: torch.Tensor) -> int:
    """How many leading keys a block of queries can see: one past the last key any of them attends to.
    mask: [Tq, n], boolean or additive float (-inf = hidden)."""
    seen = mask if mask.dtype == torch.bool else mask > float("-inf")
    return int(seen.any(dim=0).nonzero().max()) + 1


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Softmax attention weights, float32. q: [H, Tq, D]; k: [KVH, n, D]; mask: [Tq, n], [KVH, Tq, n] or None,
    boolean (True = attend) or additive float -> [H, Tq, n]. Query head h reads KV head h // (H / KVH), as in
    grouped-query attention. The scores' matmul runs in ``compute_dtype`` (the keys' own dtype skips a float32
    copy of every key), the softmax in float32."""
    h, t, d = q.shape
    kvh, n, _ = k.shape
    qg = q.to(compute_dtype).reshape(kvh, h // kvh * t, d)  # query heads of one KV head side by side
    scores = (qg @ k.to(compute_dtype).transpose(1, 2)).float().view(kvh, h // kvh, t, n) * d**-0.5  # [KVH, G, Tq, n]
    if mask is not None:
        mask = mask[:, None] if mask.dim() == 3 else mask
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1).view(h, t, n)


def read_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention output grouped by KV head: probs [H, T, n], v [KVH, n, D] -> [KVH, H/KVH * T, D] (query head
    h reads KV head h // (H / KVH), rows ordered (query head, token) within a KV head)."""
    heads, t, n = probs.shape
    return probs.to(v.dtype).reshape(v.shape[0], heads // v.shape[0] * t, n) @ v


def votes_per_kv_head(probs: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Attention summed over the queries, averaged over each KV head's query heads: [H, Tq, n] -> [KVH, n]."""
    h, _, n = probs.shape
    return probs.sum(dim=1).view(kv_heads, h // kv_heads, n).mean(dim=1)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention through PyTorch's fused kernel, with grouped-query heads. q: [H, Tq, D]; k, v:
    [KVH, n, D]; mask: [Tq, n] or [KVH, Tq, n], boolean (True = attend) or additive float -> [Tq, H*D].

    In a reduced dtype (bf16, fp16) the queries run as one block of ``H / KVH * Tq`` rows per KV head rather
    than ``H`` heads of ``Tq`` rows sharing KV heads: the same sums, but PyTorch's CPU kernel spends 4.7-6.8x
    longer on a bf16 single query (a decoding step) over 300-3000 keys in the shared layout, and up to 1.3x on
    a few (a speculative verify); float32 runs both layouts alike and keeps the shared one
    (``benchmarks/attention_kernels.py``).
    """
    heads, tq, d = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)  # some SDPA kernels want a float mask in the query's dtype
    if group > 1 and q.dtype != torch.float32:
        if mask is not None and tq > 1:  # rows of a KV head: its query heads' rows one after another
            mask = mask.repeat(group, 1) if mask.dim() == 2 else mask.repeat(1, group, 1)
        out = F.scaled_dot_product_attention(q.reshape(kv_heads, group * tq, d)[None], k[None], v[None], attn_mask=mask)
        return out[0].view(heads, tq, d).transpose(0, 1).reshape(tq, heads * d)
    if mask is not None and mask.dim() == 3:  # per-head positions after eviction
        mask = mask.repeat_interleave(group, dim=0)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(tq, heads * d)
