"""Quantized layer caches: groups, residual and sinks, per-head widths."""

from __future__ import annotations

import pytest
import torch

from kvstash.cache.kivi import Quantized, dequantize, quantize, quantized_tensor_nbytes
from kvstash.cache.kv import KVCache
from kvstash.cache.layer import HeadwiseLayerCache, KVQuantConfig, QuantizedLayerCache
from kvstash.cache.quantized import quantize_cache

BITS = (2, 4, 8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _elementwise_scale(q: Quantized) -> torch.Tensor:
    s = q.scale.float().repeat_interleave(q.group_size, dim=q.axis)
    return s.narrow(q.axis, 0, q.shape[q.axis])


def _kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (3, tokens, 16)  # kv_heads, tokens, head_dim
    return torch.randn(shape, generator=_gen(seed)), torch.randn(shape, generator=_gen(seed + 1))


L, KVH, D = 3, 3, 64


def _cache(n: int, seed: int = 0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(L, KVH, D, torch.float32, capacity=n)
    cache.extend(torch.randn(L, KVH, n, D, generator=g), torch.randn(L, KVH, n, D, generator=g), torch.arange(n))
    return cache


@pytest.mark.parametrize("bits", BITS)
def test_cache_70_tokens(bits: int) -> None:
    k, v = _kv(70)
    cache = QuantizedLayerCache(KVQuantConfig(bits=bits, group_size=32, residual=32))
    for a, b in [(0, 1), (1, 41), (41, 70)]:  # split arbitrarily
        cache.append(k[:, a:b], v[:, a:b])
    # 70 >= R + G: the oldest 32 tokens are quantized, the newest 38 (>= R) stay exact
    assert (cache.num_quantized, cache.num_residual, cache.num_tokens) == (32, 38, 70)
    rk, rv = cache.residual
    assert torch.equal(rk, k[:, 32:]) and torch.equal(rv, v[:, 32:])
    mk, mv = cache.materialize()
    assert mk.shape == mv.shape == (3, 70, 16) and mk.dtype == torch.float32
    assert torch.equal(mk[:, 32:], k[:, 32:]) and torch.equal(mv[:, 32:], v[:, 32:])
    qk, qv = quantize(k[:, :32], bits, 32, axis=1), quantize(v[:, :32], bits, 32, axis=2)
    assert torch.equal(mk[:, :32], dequantize(qk)) and torch.equal(mv[:, :32], dequantize(qv))
    assert ((mk[:, :32] - k[:, :32]).abs() <= _elementwise_scale(qk) / 2 + 1e-6).all()
    assert ((mv[:, :32] - v[:, :32]).abs() <= _elementwise_scale(qv) / 2 + 1e-6).all()
    full = 2 * k.numel() * 4
    assert cache.nbytes == qk.nbytes + qv.nbytes + 2 * 3 * 38 * 16 * 4 < full


def test_cache_split_independent_and_shrinks() -> None:
    k, v = _kv(300, seed=5)
    bulk = QuantizedLayerCache(KVQuantConfig(bits=2))
    bulk.append(k, v)
    one = QuantizedLayerCache(KVQuantConfig(bits=2))
    for t in range(300):
        one.append(k[:, t : t + 1], v[:, t : t + 1])
    assert (one.num_quantized, one.num_residual) == (bulk.num_quantized, bulk.num_residual) == (256, 44)
    for a, b in zip(one.materialize(), bulk.materialize(), strict=True):
        assert torch.equal(a, b)
    assert one.nbytes == bulk.nbytes < 0.3 * (2 * k.numel() * 4)


def test_cache_validation() -> None:
    with pytest.raises(ValueError, match="kv-bits"):
        KVQuantConfig(bits=3)
    with pytest.raises(ValueError, match="multiple of 4"):
        KVQuantConfig(group_size=30)
    assert KVQuantConfig(group_size=16).residual == 16
    cache = QuantizedLayerCache()
    with pytest.raises(ValueError, match="empty"):
        cache.materialize()
    cache.append(*_kv(5))
    with pytest.raises(ValueError, match="heads"):
        cache.append(torch.zeros(2, 1, 16), torch.zeros(2, 1, 16))


def test_layer_cache_keeps_sinks_exact_whatever_the_split() -> None:
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(KVH, 100, 16, generator=g), torch.randn(KVH, 100, 16, generator=g)
    cfg = KVQuantConfig(bits=2, group_size=32, residual=32, sinks=3)
    bulk, one = QuantizedLayerCache(cfg), QuantizedLayerCache(cfg)
    bulk.append(k, v)
    for t in range(100):
        one.append(k[:, t : t + 1], v[:, t : t + 1])
    for c in (bulk, one):  # 3 sinks, then (97 - 32) // 32 = 2 groups, 33 in the residual
        assert (c.num_sinks, c.num_quantized, c.num_residual, c.num_tokens) == (3, 64, 33, 100)
        mk, mv = c.materialize()
        assert torch.equal(mk[:, :3], k[:, :3]) and torch.equal(mv[:, 67:], v[:, 67:])
    assert all(torch.equal(a, b) for a, b in zip(bulk.materialize(), one.materialize(), strict=True))
    assert bulk.nbytes == one.nbytes


def test_layer_cache_packs_keys_and_values_at_their_own_widths() -> None:
    cfg = KVQuantConfig(bits=4, group_size=32, residual=0, key_bits=8, value_bits=2)
    store = QuantizedLayerCache(cfg)
    k, v = torch.randn(KVH, 64, D), torch.randn(KVH, 64, D)
    store.append(k, v)
    shape = (2, KVH, 32, D)  # two groups of 32 tokens
    assert store.nbytes == quantized_tensor_nbytes(shape, 8, 32, 2) + quantized_tensor_nbytes(shape, 2, 32, 3)
    kq, vq = store.materialize()
    k_err, v_err = (kq - k).abs().max().item(), (vq - v).abs().max().item()
    assert k_err < 0.05 < v_err < 2.0  # 8-bit keys are fine-grained, 2-bit values coarse
    with pytest.raises(ValueError, match="key_bits must be one of"):
        KVQuantConfig(bits=4, key_bits=3)
    with pytest.raises(ValueError, match="value_bits must be one of"):
        KVQuantConfig(bits=16, value_bits=4)  # a 16-bit cache quantizes nothing


def test_a_balanced_allocation_holds_the_bytes_of_uniform_4_bit() -> None:
    dense = _cache(300)
    uniform = quantize_cache(dense, 4)
    bits = torch.full((L, KVH, 2), 4)
    bits[0, :, 0] = 8  # layer 0: every head's keys at 8 bits ...
    bits[1] = 2  # ... paid for by all of layer 1 at 2 bits
    bits[2, 1, 1], bits[2, 0, 0], bits[2, 2, 0] = 8, 2, 2  # layer 2: one head's values up, two heads' keys down
    mixed = quantize_cache(dense, 4, bits)
    assert mixed.nbytes == uniform.nbytes
    assert isinstance(mixed.stores[0], QuantizedLayerCache) and mixed.stores[0].config.key_bits == 8
    assert isinstance(mixed.stores[2], HeadwiseLayerCache)
    assert [(h.config.key_bits, h.config.value_bits) for h in mixed.stores[2].heads] == [(2, 4), (4, 8), (2, 4)]
    for layer, head, what, finer in ((0, 0, 0, True), (2, 1, 1, True), (2, 0, 0, False)):
        exact, got_u, got_m = (c.layer(layer)[what][head] for c in (dense, uniform, mixed))
        err_u, err_m = (got_u - exact).abs().max(), (got_m - exact).abs().max()
        assert err_m < err_u / 8 if finer else err_m > err_u * 3, (layer, head, what, err_u, err_m)
    with pytest.raises(ValueError, match="head_bits must be \\[layers, kv_heads, 2\\]"):
        quantize_cache(dense, 4, torch.full((L, 2), 4))


def test_headwise_layer_cache_is_its_heads_side_by_side() -> None:
    cfgs = [KVQuantConfig(bits=4, group_size=32, residual=8, sinks=1, key_bits=b, value_bits=b) for b in (2, 4, 8)]
    k, v = torch.randn(KVH, 150, D), torch.randn(KVH, 150, D)
    whole, split = HeadwiseLayerCache(cfgs), HeadwiseLayerCache(cfgs)
    whole.append(k, v)
    for s in range(0, 150, 7):  # decoding-like appends quantize the same groups
        split.append(k[:, s : s + 7], v[:, s : s + 7])
    alone = [QuantizedLayerCache(c) for c in cfgs]
    for i, store in enumerate(alone):
        store.append(k[i : i + 1], v[i : i + 1])
    want = [torch.cat(parts) for parts in zip(*(s.materialize() for s in alone), strict=True)]
    for got in (whole.materialize(), split.materialize()):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert whole.nbytes == split.nbytes == sum(s.nbytes for s in alone)
    assert (whole.num_sinks, whole.num_quantized, whole.num_tokens) == (1, 128, 150)
    with pytest.raises(ValueError, match="same group size"):
        HeadwiseLayerCache([cfgs[0], KVQuantConfig(bits=4, group_size=64)])
    with pytest.raises(ValueError, match="3 heads"):
        whole.append(k[:2], v[:2])
