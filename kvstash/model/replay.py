"""Query replay: recompute the queries of some prompt tokens against the finished cache and show each layer's
attention weights, without changing the cache.

The hidden states of a block of prompt tokens depend only on the cached K/V of the tokens up to them, so any
block's queries can be recomputed exactly after any prefill (full, prefix, blend), without hooks inside it.
SnapKV's votes, H2O's accumulated attention (:mod:`kvstash.compress.evict`) and the per-head sensitivity of
bit allocation (:mod:`kvstash.compress.bits`) are all read this way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvstash.cache.kv import KVCache
from kvstash.model.attention import attention_probs, read_values, votes_per_kv_head
from kvstash.model.runner import LayerHook, Rows, Runner

# observe(layer, q [H, T, D], probs [H, T, e], mask [T, e]): one block of replayed queries at one layer
ReplayObserver = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


class _Replay(LayerHook):
    """Attention spelled out in float32 so its weights can be shown; the values read with those same weights."""

    def __init__(self, observe: ReplayObserver):
        self.observe_probs = observe

    def attend(self, layer, q, k, v, mask) -> torch.Tensor:
        probs = attention_probs(q, k, mask)  # [H, T, e]
        self.observe_probs(layer, q, probs, mask)
        heads, t, _ = probs.shape
        out = read_values(probs, v).view(heads, t, -1)  # [H, T, D]
        return out.transpose(0, 1).reshape(t, -1)


@torch.inference_mode()
def replay_queries(
    runner: Runner, cache: KVCache, token_ids, start: int, end: int, observe: ReplayObserver, block: int = 512
) -> None:
    """Recompute the queries of the prompt's tokens ``[start, end)`` against the finished ``cache`` and show
    each layer's attention to ``observe(layer, q, probs, mask)``: q ``[H, T, D]`` of one query block of tokens
    ``[s, e)``, probs ``[H, T, e]`` its softmax over slots ``[0, e)`` (later slots are later positions,
    invisible to it) and the causal ``mask`` ``[T, e]`` it was computed with (float if the cache has a bias).

    ``cache`` must be the prompt's cache right after prefill (uniform, slot i = position i =
    ``token_ids[i]``); blocks of ``block`` queries bound memory. Changes nothing.
    """
    n = cache.length
    if not cache.uniform or len(token_ids) != n or not torch.equal(cache.positions, torch.arange(n)):
        raise ValueError("replaying prompt queries needs the prompt's cache as prefilled (evict before decoding)")
    hook = _Replay(observe)
    for s in range(start, end, block):
        e = min(s + block, end)
        ids = torch.as_tensor(token_ids[s:e], dtype=torch.long)
        # this block's own K/V are already in the cache: nothing is written
        runner.run([Rows(ids, torch.arange(s, e), cache, slots=torch.arange(s, e), hook=hook, write=False)])


def attention_votes(runner: Runner, cache: KVCache, token_ids, start: int, end: int, block: int = 512):
    """Votes of the prompt's queries ``[start, end)`` for every cached slot: ``[layers, kv_heads, n]``
    (see :func:`replay_queries` for what ``cache`` must be)."""
    votes = torch.zeros(cache.layers, cache.kv_heads, cache.length)

    def observe(layer: int, q, probs: torch.Tensor, mask) -> None:
        votes[layer, :, : probs.shape[-1]] += votes_per_kv_head(probs, cache.kv_heads)

    replay_queries(runner, cache, token_ids, start, end, observe, block)
    return votes
