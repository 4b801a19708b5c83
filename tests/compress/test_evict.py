"""Eviction policies: exactly which tokens each keeps, budgets, parsing, and decoding over a per-head cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvstash.cache.kv import KVCache
from kvstash.compress.evict import (
    H2O,
    DecodeEvictor,
    SnapKV,
    StreamingLLM,
    parse_evict,
    start_eviction,
    top_slots,
)
from kvstash.model.attention import causal_mask
from kvstash.model.runner import Runner

KVH, H, D = 2, 4, 4  # the constructed cases: 2 KV heads, 2 query heads each


def _cache(n: int, kv_heads: int = KVH, layers: int = 1, seed: int = 0) -> KVCache:
    cache = KVCache(layers, kv_heads, D, torch.float32, capacity=n)
    g = torch.Generator().manual_seed(seed)
    cache.extend(torch.randn(layers, kv_heads, n, D, generator=g), torch.randn(layers, kv_heads, n, D, generator=g),
                 torch.arange(n))  # fmt: skip
    return cache


class FakeRunner(Runner):
    """The real layer loop over one fake layer whose queries are given per position."""

    def __init__(self, q_at: torch.Tensor):
        self.q_at = q_at  # [H, n, D]: the query of each position
        self.num_layers, self.block = 1, 512
        self.rope = SimpleNamespace(cos_sin=lambda pos: (pos, pos))

    def embed(self, ids):
        return torch.zeros(len(ids), 1)

    def qkv(self, layer, h, cos, sin):  # cos carries the positions; replay writes no keys or values
        return self.q_at[:, cos], torch.zeros(KVH, len(cos), D), torch.zeros(KVH, len(cos), D)

    def finish(self, layer, h, attn_out):
        return h


def _snap_case(n: int = 16) -> tuple[FakeRunner, KVCache]:
    """KV head 0's window queries look only at token 3, KV head 1's only at token 9."""
    cache = _cache(n)
    k = torch.zeros(1, KVH, n, D)
    k[0, 0, 3, 0] = k[0, 1, 9, 1] = 10.0
    cache.k[:, :, :n] = k
    q = torch.zeros(H, n, D)
    q[0:2, :, 0] = q[2:4, :, 1] = 10.0  # query heads 0-1 read KV head 0, 2-3 read KV head 1
    return FakeRunner(q), cache


def _masked_decode(runner, cache: KVCache, kept: torch.Tensor, token: int, pos: int) -> torch.Tensor:
    """Reference: one decoding step over the full cache with the evicted tokens masked per layer and head.
    kept: [L, KVH, n] bool over the full cache's slots."""
    p = torch.tensor([pos])
    cos, sin = runner.rope.cos_sin(p)
    start = cache.append(p)
    kept = torch.cat([kept, torch.ones(*kept.shape[:2], 1, dtype=torch.bool)], dim=2)  # the new token
    h = runner.embed(torch.tensor([token]))
    for i in range(runner.num_layers):
        q, k, v = runner.qkv(i, h, cos, sin)
        cache.write(i, start, k, v)
        k_all, v_all, k_pos = cache.layer(i)
        mask = causal_mask(p, k_pos) & kept[i][:, None, :]  # [KVH, 1, n]
        h = runner.finish(i, h, runner.attend(q, k_all, v_all, mask))
    return runner.logits(h)[0]


def test_parse_evict() -> None:
    assert parse_evict("snapkv:0.25") == SnapKV(0.25)
    assert parse_evict("streaming:0.1") == StreamingLLM(0.1)
    assert parse_evict("h2o:512") == H2O(512)
    assert parse_evict("h2o:512:decode") == H2O(512, decode=True)
    assert parse_evict("streaming:64:decode").decode


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("lru:0.5", "unknown eviction policy 'lru'.*snapkv, streaming, h2o"),
        ("snapkv", "needs a budget"),
        ("snapkv:0", "ratio of the prompt in \\(0, 1\\)"),
        ("snapkv:1.5", "whole number of tokens"),
        ("snapkv:-3", "budget"),
        ("snapkv:half", "budget 'half'"),
        ("h2o:0.5:fast", "only option after the budget is ':decode'"),
        ("snapkv:0.5:decode", "snapkv applies after prefill only"),
    ],
)
def test_parse_evict_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_evict(spec)


def test_policy_validation() -> None:
    for bad in (0.0, 1.0, 0, True, "0.5"):
        with pytest.raises(ValueError, match="budget"):
            SnapKV(bad)
    with pytest.raises(ValueError, match="odd"):
        SnapKV(0.5, kernel=4)
    with pytest.raises(ValueError, match="window"):
        H2O(0.5, window=-1)
    with pytest.raises(ValueError, match="recent"):
        H2O(0.5, recent=1.5)
    with pytest.raises(ValueError, match="sinks"):
        StreamingLLM(0.5, sinks=-1)


def test_budget_as_ratio_and_count() -> None:
    assert SnapKV(0.25).budget_tokens(100) == 25
    assert SnapKV(0.1).budget_tokens(3) == 1  # rounds, but keeps at least one
    assert H2O(512).budget_tokens(100) == 100  # a count above the prompt keeps everything
    assert H2O(40).budget_tokens(100) == 40


def test_top_slots_keeps_protected_then_best_with_ties_to_lower_slot() -> None:
    scores = torch.tensor([[[5.0, 1.0, 3.0, 3.0, 0.0, 9.0], [0.0, 0.0, 0.0, 0.0, 7.0, 1.0]]])  # [1, 2, 6]
    protected = torch.tensor([False, False, False, False, True, False])
    assert top_slots(scores, protected, 3).tolist() == [[[0, 4, 5], [0, 4, 5]]]
    assert top_slots(scores, protected, 4).tolist() == [[[0, 2, 4, 5], [0, 1, 4, 5]]]
    # a budget below the protected set keeps just the protected set
    assert top_slots(scores, torch.tensor([True] * 3 + [False] * 3), 1).tolist() == [[[0, 1, 2], [0, 1, 2]]]


def test_streaming_keeps_sinks_and_recent_tokens_uniformly() -> None:
    cache = _cache(20)
    k_before = cache.keys.clone()
    report = StreamingLLM(8, sinks=4).apply(None, cache, list(range(20)))
    kept = [0, 1, 2, 3, 16, 17, 18, 19]
    assert (report.before, report.kept) == (20, 8)
    assert cache.uniform and cache.positions.tolist() == kept
    assert torch.equal(cache.keys, k_before[:, :, kept])
    cache = _cache(20)
    StreamingLLM(0.5, sinks=2).apply(None, cache, list(range(20)))
    assert cache.positions.tolist() == [0, 1] + list(range(12, 20))


def test_snapkv_per_head_votes_pooling_and_window() -> None:
    runner, cache = _snap_case()
    report = SnapKV(7, window=4, kernel=3).apply(runner, cache, list(range(16)))
    # each head keeps its voted token, its pooled neighbours and the window 12..15
    assert cache.pos[0, :, :7].tolist() == [[2, 3, 4, 12, 13, 14, 15], [8, 9, 10, 12, 13, 14, 15]]
    assert not cache.uniform and report.kept == 7
    # 4 window queries, each ~all of its attention on the voted token
    assert report.scores[0, 0, 3] == pytest.approx(4.0, abs=1e-6)
    assert report.scores[0, 1, 9] == pytest.approx(4.0, abs=1e-6)
    # without pooling only the voted token itself joins the window
    runner, cache = _snap_case()
    SnapKV(5, window=4, kernel=1).apply(runner, cache, list(range(16)))
    assert cache.pos[0, :, 0].tolist() == [3, 9] and cache.pos[0, :, 1:5].tolist() == [[12, 13, 14, 15]] * 2


def test_h2o_accumulates_attention_over_all_prompt_queries() -> None:
    n = 12
    cache = _cache(n, seed=1)
    runner = FakeRunner(torch.zeros(H, n, D))  # zero queries: position p spreads 1 / (p + 1) over tokens <= p
    report = H2O(6, window=2, recent=0.0, block=5).apply(runner, cache, list(range(n)))  # blocks 0-4, 5-9, 10-11
    expected = torch.tensor([sum(1 / (p + 1) for p in range(j, n)) for j in range(n)])
    assert torch.allclose(report.scores, expected.expand(1, KVH, n), atol=1e-6)
    assert cache.uniform and cache.positions.tolist() == [0, 1, 2, 3, 10, 11]
    cache = _cache(n, seed=1)  # by default half the budget goes to the most recent tokens
    H2O(6, window=2).apply(runner, cache, list(range(n)))
    assert cache.positions.tolist() == [0, 1, 2, 9, 10, 11]


def test_decoding_after_per_head_eviction_equals_masked_full_attention(engine) -> None:
    runner = engine.runner
    text = "Marie Curie discovered polonium and radium. The Danube flows through Vienna and Budapest. Question:"
    ids = torch.tensor(engine.tokenizer(text)["input_ids"])
    n = len(ids)
    cache = runner.new_cache()
    runner.forward(ids, torch.arange(n), cache)
    full = cache.clone()
    SnapKV(n // 3, window=4).apply(runner, cache, ids.tolist())
    assert not cache.uniform  # the heads chose differently
    kept = torch.zeros(runner.num_layers, runner.kv_heads, n, dtype=torch.bool)
    kept.scatter_(2, cache.pos[:, :, : cache.length], True)
    for step, token in enumerate([17, 2031, 30]):
        pos = n + step
        ours = runner.forward(torch.tensor([token]), torch.tensor([pos]), cache)
        ref = _masked_decode(runner, full, kept, token, pos)
        kept = torch.cat([kept, torch.ones(*kept.shape[:2], 1, dtype=torch.bool)], dim=2)
        assert (ours - ref).abs().max().item() < 1e-4, step


def test_decode_evictor_holds_the_budget(engine) -> None:
    runner = engine.runner
    ids = torch.tensor(engine.tokenizer("a b c d e f g h i j k l m n o p q r s t u v w x y z")["input_ids"])
    n = len(ids)
    for policy in (StreamingLLM(12, sinks=2, decode=True), H2O(12, window=3, decode=True)):
        cache = runner.new_cache()
        runner.forward(ids, torch.arange(n), cache)
        ev = start_eviction(policy, runner, cache, ids.tolist())
        assert isinstance(ev, DecodeEvictor) and cache.length == 12
        for step in range(4):
            pos = n + step
            runner.forward(torch.tensor([264]), torch.tensor([pos]), cache, hook=ev)  # evicts once done
            assert cache.length == 12 and bool((cache.pos[:, :, : cache.length] == pos).any(dim=-1).all())
        if policy.name == "streaming":
            assert cache.positions.tolist() == [0, 1] + list(range(n + 4 - 10, n + 4))
        else:
            assert ev.votes.shape == (runner.num_layers, runner.kv_heads, 12)
