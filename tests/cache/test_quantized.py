"""The quantized decode cache: packed bytes, reads, refusals, decode quality, the logit bias kept."""

from __future__ import annotations

import pytest
import torch

from kvstash.bench.metrics import kl_divergence
from kvstash.cache.kivi import quantized_tensor_nbytes
from kvstash.cache.kv import KVCache
from kvstash.cache.layer import KVQuantConfig
from kvstash.cache.quantized import QuantizedKVCache, quantize_cache
from kvstash.engine import Engine

L, KVH, D = 2, 3, 64


def _cache(n: int, seed: int = 0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(L, KVH, D, torch.float32, capacity=n)
    cache.extend(torch.randn(L, KVH, n, D, generator=g), torch.randn(L, KVH, n, D, generator=g), torch.arange(n))
    return cache


def _quantized_span(n: int, cfg: KVQuantConfig) -> tuple[int, int]:
    """(first, count) of the quantized tokens of a cache of n tokens: after the sinks, whole groups, >= R left."""
    s = min(cfg.sinks, n)
    nq = max(0, (n - s - cfg.residual) // cfg.group_size) * cfg.group_size if cfg.bits != 16 else 0
    return s, nq


def _packed_nbytes(n: int, cfg: KVQuantConfig) -> int:
    """Packed codes + fp16 scale/zero of the quantized groups, fp16 sinks and residual, for n tokens."""
    g = cfg.group_size
    _, nq = _quantized_span(n, cfg)
    per_layer = 2 * KVH * (n - nq) * D * 2
    if nq:
        shape = (nq // g, KVH, g, D)
        per_layer += quantized_tensor_nbytes(shape, cfg.bits, g, 2) + quantized_tensor_nbytes(shape, cfg.bits, g, 3)
    return L * per_layer


def _demo_text(engine: Engine, tokens: int) -> torch.Tensor:
    from pathlib import Path

    import kvstash

    docs = sorted((Path(kvstash.__file__).parent / "demo_docs").glob("*.txt"))
    return torch.tensor(engine.tokenizer(" ".join(p.read_text() for p in docs))["input_ids"][:tokens])


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_from_cache_holds_packed_bytes_and_reads_them_back(bits: int) -> None:
    n = 300
    dense = _cache(n)
    q = quantize_cache(dense, bits)
    cfg = q.config
    assert cfg == KVQuantConfig.for_bits(bits)
    assert q.nbytes == _packed_nbytes(n, cfg)
    assert q.working_nbytes == dense.nbytes  # the dense copy attention reads, reported apart
    s, nq = _quantized_span(n, cfg)
    assert s == 1  # the first token, an attention sink, stays exact
    for i, store in enumerate(q.stores):
        assert (store.num_sinks, store.num_quantized) == (s, nq)
        k, v = store.materialize()
        assert torch.equal(q.keys[i], k) and torch.equal(q.values[i], v)
        # sinks and residual are the fp16 of the original; quantized tokens within one step of their group
        for part in (slice(0, s), slice(s + nq, n)):
            assert torch.equal(q.keys[i, :, part], dense.keys[i, :, part].half().float())
            assert torch.equal(q.values[i, :, part], dense.values[i, :, part].half().float())
        quantized = slice(s, s + nq)
        err = (q.keys[i, :, quantized] - dense.keys[i, :, quantized]).abs().max().item() if nq else 0.0
        assert err <= {2: 1.5, 4: 0.4, 8: 0.03, 16: 0.0}[bits]
    assert torch.equal(q.positions, dense.positions)


@pytest.mark.parametrize(("bits", "most"), [(2, 0.2), (4, 0.3), (8, 0.6), (16, 1.0)])
def test_bytes_per_token_of_a_long_prompt(bits: int, most: float) -> None:
    n = 3500  # the needle prompts' length; the fp16 residual of 32..63 (4 bits: 32..95) tokens is included
    ratio = quantize_cache(_cache(n), bits).nbytes / (2 * L * KVH * n * D * 2)
    assert ratio <= most, ratio


def test_quantized_cache_refuses_eviction_and_rewrites() -> None:
    q = quantize_cache(_cache(40), 4)
    with pytest.raises(ValueError, match="evict first"):
        q.keep(torch.arange(10))
    with pytest.raises(ValueError, match="rolled back"):
        q.truncate(10)
    with pytest.raises(ValueError, match="append-only"):
        q.write(0, 3, torch.zeros(KVH, 1, D), torch.zeros(KVH, 1, D))


def test_quantized_decode_logits_close_to_full_precision(engine) -> None:
    """Decoding 12 tokens over a 120-token prompt's cache. Tolerances (fp32 model, logits of size ~10-20):
    16 bits max |dlogit| < 0.05; 8 bits < 0.25; 4 bits KL < 0.1 nats per token; 2 bits KL < 2."""
    r = engine.runner
    ids = _demo_text(engine, 132)
    cache = r.new_cache()
    r.forward(ids[:120], torch.arange(120), cache)
    ref = r.forward(ids[120:], torch.arange(120, 132), cache.clone(), all_logits=True)
    for bits in (16, 8, 4, 2):
        q = quantize_cache(cache, bits)
        out = torch.stack([r.forward(ids[i : i + 1], torch.tensor([i]), q) for i in range(120, 132)])
        q.check_integrity()
        diff, kl = (out - ref).abs().max().item(), kl_divergence(ref, out).max().item()
        assert {16: diff < 0.05, 8: diff < 0.25, 4: kl < 0.1, 2: kl < 2.0}[bits], (bits, diff, kl)


def test_quantizing_keeps_the_caches_logit_bias() -> None:
    dense = _cache(100)
    dense.add_bias(1, torch.tensor([5, 50]), -0.25)
    q = quantize_cache(dense, 4)
    assert torch.equal(q.layer_bias(1), dense.layer_bias(1)) and q.layer_bias(0).abs().sum() == 0
    q.append(torch.tensor([100]))
    assert q.layer_bias(1).shape[-1] == 101 and q.layer_bias(1)[0, -1].item() == 0.0


def test_decode_appends_and_quantizes_whole_groups() -> None:
    dense = _cache(100, seed=1)
    q = QuantizedKVCache.from_cache(dense, KVQuantConfig(bits=4, group_size=32, residual=32, sinks=1))
    assert [s.num_quantized for s in q.stores] == [64, 64]  # 1 sink, 2 groups, 35 in the residual
    more = _cache(40, seed=2)
    for t in range(40):  # one token at a time, as decoding does; crosses a group boundary at token 129
        start = q.append(torch.tensor([100 + t]))
        for i in range(L):
            q.write(i, start, more.keys[i, :, t : t + 1], more.values[i, :, t : t + 1])
    q.check_integrity()
    assert q.length == 140 and [s.num_quantized for s in q.stores] == [96, 96]
    for i, store in enumerate(q.stores):  # the working copy was patched, never rebuilt: still exact
        k, v = store.materialize()
        assert torch.equal(q.keys[i], k) and torch.equal(q.values[i], v)
    assert q.nbytes == _packed_nbytes(140, q.config)
