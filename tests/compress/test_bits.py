"""Bit allocation (--kv-alloc mixed): exact trades and the sensitivity measure."""

from __future__ import annotations

import pytest
import torch

from kvstash.cache.layer import KVQuantConfig, QuantizedLayerCache
from kvstash.compress.bits import allocate_bits, sensitivity
from kvstash.model.runner import Watch

L, KVH, D = 3, 3, 64


def _at_widths(e4: list[float], blowup: float = 25.0) -> torch.Tensor:
    """Errors [3, N] at 2 / 4 / 8 bits: 8 bits 1/289 of 4 bits' (the min-max step squared), 2 bits ``blowup``x."""
    e = torch.tensor(e4)
    return torch.stack([e * blowup, e, e / 289])


DOCS = [
    "Marie Curie discovered polonium and radium together with Pierre Curie.",
    "The Danube flows through Vienna, Bratislava, Budapest and Belgrade.",
]


def test_allocation_promotes_the_sensitive_and_pays_with_the_least_sensitive() -> None:
    errors = _at_widths([1e-4, 10.0, 2e-5, 1.0, 1e-4, 5e-5])
    # 1st trade: 10.0 up, 2e-5 and 5e-5 down; 2nd: 1.0 up, the two 1e-4 down; then the orders meet
    assert allocate_bits(errors).tolist() == [2, 8, 2, 8, 2, 2]


def test_allocation_demotes_by_measured_2_bit_loss_not_by_4_bit_error() -> None:
    errors = _at_widths([5.0, 0.01, 0.02, 0.03, 0.04])
    errors[0, 1] = 100.0  # tensor 1 is the least harmed at 4 bits but breaks down at 2
    assert allocate_bits(errors).tolist() == [8, 4, 2, 2, 4]


def test_allocation_stops_when_a_trade_would_cost_more_than_it_gains() -> None:
    assert allocate_bits(_at_widths([1.0] * 9)).tolist() == [4] * 9  # demoting two costs 48x one promotion's gain
    # one clear outlier is worth it, a second one (0.1 vs 2 x 24 x 0.01) is not
    errors = _at_widths([5.0, 0.1, 0.01, 0.01, 0.01, 0.01])
    assert allocate_bits(errors).tolist() == [8, 4, 2, 2, 4, 4]


def test_allocation_keeps_the_mean_width() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        e4 = torch.rand(60, generator=g) ** 8  # heavy-tailed, like real sensitivities
        errors = torch.stack([e4 * (20 + 400 * torch.rand(60, generator=g)), e4, e4 / 289])
        bits = allocate_bits(errors)
        assert int(bits.sum()) == 4 * 60 and set(bits.tolist()) <= {2, 4, 8}
        assert bits[e4.argmax()] == 8 and bits[(errors[0] - e4).argmin()] == 2


def test_allocation_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="around 4 bits"):
        allocate_bits(_at_widths([1.0] * 4), base=2)
    with pytest.raises(ValueError, match="values >= 0"):
        allocate_bits(_at_widths([1.0, -1.0]))
    with pytest.raises(ValueError, match="values >= 0"):
        allocate_bits(_at_widths([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"\[3, N\]"):
        allocate_bits(torch.ones(5))


def test_sensitivity_is_the_relative_error_of_the_attention_output(engine) -> None:
    """Per layer and KV head, the score equals |o' - o|^2 / |o|^2 of the outputs of the query heads reading that
    KV head, computed with the runner's own SDPA attention for the replayed queries, over K/V quantized as the
    decode cache holds them."""
    r = engine.runner
    ids = engine.tokenizer(" ".join(DOCS * 8))["input_ids"][:200]
    cache = r.new_cache()
    r.forward(torch.tensor(ids), torch.arange(len(ids)), cache)
    cfg = KVQuantConfig(bits=4, group_size=32, residual=8, sinks=1)
    window = 16
    finer = KVQuantConfig(bits=8, group_size=32, residual=8, sinks=1)
    both = sensitivity(r, cache, ids, [cfg, finer], window)
    assert both.shape == (2, r.num_layers, r.kv_heads, 2) and bool((both > 0).all())
    scores = both[0]
    queries = {}

    def per_kv_head(out: torch.Tensor) -> torch.Tensor:  # [Tq, H * D] -> [KVH, Tq, H/KVH * D]
        return out.view(out.shape[0], r.kv_heads, -1).transpose(0, 1)

    replay = cache.clone()
    replay.truncate(len(ids) - window)  # the same queries, from the runner's own forward
    r.forward(torch.tensor(ids[-window:]), torch.arange(len(ids) - window, len(ids)), replay,
              hook=Watch(lambda layer, q, k, m: queries.__setitem__(layer, (q, m))))  # fmt: skip
    for layer in (0, 7, 18):
        q, mask = queries[layer]
        k, v, _ = cache.layer(layer)
        store = QuantizedLayerCache(cfg)
        store.append(k.half(), v.half())
        kq, vq = store.materialize()
        exact = per_kv_head(r.attend(q, k, v, mask))  # [KVH, Tq, H/KVH * D]
        scale = exact.pow(2).sum(dim=(1, 2))
        want = [
            (per_kv_head(r.attend(q, kq, v, mask)) - exact).pow(2).sum(dim=(1, 2)) / scale,
            (per_kv_head(r.attend(q, k, vq, mask)) - exact).pow(2).sum(dim=(1, 2)) / scale,
        ]
        torch.testing.assert_close(scores[layer], torch.stack(want, dim=1).float(), rtol=1e-3, atol=1e-9)
    assert bool((both[1].sum(dim=(1, 2)) < scores.sum(dim=(1, 2)) / 20).all())  # 8 bits: far smaller, every layer
