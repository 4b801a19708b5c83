"""Attention math and query replay: float masks, the fused kernel's two layouts equal the math, replayed votes
equal the prefill's own attention."""

from __future__ import annotations

import pytest
import torch

from kvstash.model.attention import (
    attention_probs,
    biased_mask,
    causal_mask,
    read_values,
    sdpa,
    votes_per_kv_head,
)
from kvstash.model.replay import attention_votes
from kvstash.model.runner import Watch


def test_attention_probs_takes_an_additive_float_mask() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(6, 4, 8), torch.randn(2, 5, 8)
    mask = causal_mask(torch.arange(1, 5), torch.arange(5))  # [4, 5]
    bias = torch.tensor([0.0, -1.0, 0.0, 0.5, 0.0])
    plain = attention_probs(q, k, mask)
    assert torch.allclose(attention_probs(q, k, biased_mask(mask, torch.zeros(5))), plain)
    biased = attention_probs(q, k, biased_mask(mask, bias))  # weights times e^bias, then renormalized
    expect = plain * bias.exp()
    assert torch.allclose(biased, expect / expect.sum(-1, keepdim=True), atol=1e-6)
    assert biased[:, 0, 4].abs().sum() == 0  # still causal


def _masks(tq: int, n: int) -> dict:
    """Every kind of mask the layer loop hands attention, for queries at the last ``tq`` of ``n`` positions."""
    q_pos, k_pos = torch.arange(n - tq, n), torch.arange(n)
    causal = causal_mask(q_pos, k_pos)  # [Tq, n]
    heads_pos = torch.stack([k_pos, k_pos + 2, k_pos - 1])  # [KVH, n]: per-head positions, as after eviction
    return {
        "none": None,
        "bool": causal,
        "float": biased_mask(causal, torch.linspace(-1.0, 0.5, n)),
        "per-head": causal_mask(q_pos, heads_pos),  # [KVH, Tq, n]
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tq", [1, 3, 70])
@pytest.mark.parametrize("kind", ["none", "bool", "float", "per-head"])
def test_sdpa_equals_the_attention_math_in_either_layout(dtype, tq, kind) -> None:
    # float32 runs the shared-KV call, bf16 and fp16 rows grouped per KV head: each must read what query head h of
    # KV head h // 3 should, for one query, a few and many, under every kind of mask
    torch.manual_seed(0)
    n = 80
    q, k, v = torch.randn(9, tq, 16), torch.randn(3, n, 16), torch.randn(3, n, 16)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = _masks(tq, n)[kind]
    probs = attention_probs(q.float(), k.float(), mask)  # [H, Tq, n]
    expect = read_values(probs, v.float()).view(9, tq, 16).transpose(0, 1).reshape(tq, 9 * 16)
    got = sdpa(q, k, v, mask)
    assert got.shape == (tq, 9 * 16) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got.float(), expect, atol=tol, rtol=tol), (got.float() - expect).abs().max()


def test_replayed_votes_equal_the_attention_of_one_full_forward(engine) -> None:
    """attention_votes recomputes queries against the finished cache, in blocks; the reference observes the
    attention of the prefill itself."""
    runner = engine.runner
    ids = torch.tensor(engine.tokenizer("One, two, three, four, five, six, seven, eight, nine, ten.")["input_ids"])
    n, w = len(ids), 6
    seen = {}
    cache = runner.new_cache()
    runner.forward(ids, torch.arange(n), cache, hook=Watch(lambda i, q, k, m: seen.setdefault(i, (q, k, m))))
    votes = attention_votes(runner, cache, ids.tolist(), n - w, n, block=4)
    for i, (q, k, m) in seen.items():
        ref = votes_per_kv_head(attention_probs(q, k, m)[:, n - w :], runner.kv_heads)
        assert torch.allclose(votes[i], ref, atol=1e-5), i
