"""Attention math and query replay: float masks, replayed votes equal the prefill's own attention."""

from __future__ import annotations

import torch

from kvstash.model.attention import attention_probs, biased_mask, causal_mask, votes_per_kv_head
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
