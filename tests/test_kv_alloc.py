"""Mixed-precision decode cache (--kv-alloc mixed): the bit allocation, per-layer widths in the packed cache,
the sensitivity measure against SDPA, and the wiring through the engine, CLI and bench specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kvstash
from kvstash.bench.methods import parse_method
from kvstash.cache.kivi import quantized_tensor_nbytes
from kvstash.cache.kv import KVCache
from kvstash.cache.layer import HeadwiseLayerCache, KVQuantConfig, QuantizedLayerCache
from kvstash.cache.quantized import QuantizedKVCache, quantize_cache
from kvstash.compress.bits import allocate_bits, sensitivity
from kvstash.compress.pipeline import Compression
from kvstash.model.runner import Watch
from kvstash.prompt import Segment
from kvstash.sampling import SamplingParams

L, KVH, D = 3, 3, 64


# --- allocate_bits: exact outcomes --------------------------------------------------------------------------
def _at_widths(e4: list[float], blowup: float = 25.0) -> torch.Tensor:
    """Errors [3, N] at 2 / 4 / 8 bits: 8 bits 1/289 of 4 bits' (the min-max step squared), 2 bits ``blowup``x."""
    e = torch.tensor(e4)
    return torch.stack([e * blowup, e, e / 289])


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


# --- per-head widths in the packed cache -------------------------------------------------------------------
def _cache(n: int) -> KVCache:
    g = torch.Generator().manual_seed(0)
    cache = KVCache(L, KVH, D, torch.float32, capacity=n)
    cache.extend(torch.randn(L, KVH, n, D, generator=g), torch.randn(L, KVH, n, D, generator=g), torch.arange(n))
    return cache


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


# --- the sensitivity measure --------------------------------------------------------------------------------
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


# --- wiring ---------------------------------------------------------------------------------------------------
DOCS = [
    "Marie Curie discovered polonium and radium together with Pierre Curie.",
    "The Danube flows through Vienna, Bratislava, Budapest and Belgrade.",
]
QUESTION = "Which elements did Marie Curie discover?"


def test_compression_refuses_a_mixed_allocation_off_4_bits() -> None:
    with pytest.raises(ValueError, match="use it with --kv-bits 4"):
        Compression.parse(kv_bits=8, kv_alloc="mixed")
    with pytest.raises(ValueError, match="use it with --kv-bits 4"):
        Compression.parse(kv_alloc="mixed")
    with pytest.raises(ValueError, match="kv-alloc must be one of uniform, mixed"):
        Compression.parse(kv_bits=4, kv_alloc="greedy")
    assert Compression.parse(4, None, "mixed").kv_alloc == "mixed"


def test_engine_mixed_cache_reports_its_widths_and_uniform_bytes(engine) -> None:
    segs = [Segment(d) for d in DOCS * 4] + [Segment(QUESTION, "user")]
    params = SamplingParams(max_tokens=4)
    uniform = engine.generate(segs, params, kv_bits=4)
    mixed = engine.generate(segs, params, kv_bits=4, kv_alloc="mixed")
    widths = torch.tensor(mixed.summary()["kv_head_bits"])
    assert widths.shape == (engine.runner.num_layers, engine.runner.kv_heads, 2)
    assert int(widths.sum()) == 4 * widths.numel() and bool((widths == 8).any()) and bool((widths == 2).any())
    assert mixed.kv_bytes == uniform.kv_bytes
    assert "kv_head_bits" not in uniform.summary()
    pre = engine.prefill(engine.plan(segs), kv_bits=4, kv_alloc="mixed")
    assert isinstance(pre.cache, QuantizedKVCache) and torch.equal(pre.cache.head_bits, widths)


def test_cli_kv_alloc(capsys) -> None:
    from kvstash.cli import main

    doc = str(Path(kvstash.__file__).parent / "demo_docs" / "curie.txt")
    args = ["ask", QUESTION, "--doc", doc, "--max-tokens", "2", "--json", "--kv-bits"]
    assert main([*args, "4", "--kv-alloc", "mixed"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert torch.tensor(out["kv_head_bits"]).shape == (30, 3, 2)
    assert main([*args, "2", "--kv-alloc", "mixed"]) == 2
    assert "use it with --kv-bits 4" in capsys.readouterr().err


def test_bench_spec_kv4mixed() -> None:
    m = parse_method("blend:0.15@kv4mixed")
    assert (m.kv_bits, m.kv_alloc) == (4, "mixed")
    assert m.engine_kwargs == {"kv_bits": 4, "kv_alloc": "mixed"}
    assert parse_method("full@kv4").engine_kwargs == {"kv_bits": 4}
    with pytest.raises(ValueError, match="use @kv4mixed"):
        parse_method("full@kv2mixed")


def test_mixed_cache_after_blending_from_a_packed_store(lm) -> None:
    """Composes: chunks from a kivi4 store, blended, then the decode cache allocated and packed."""
    from kvstash.engine import Engine, EngineConfig

    eng = Engine(EngineConfig(store="ram:64MiB", codec="kivi4"), loaded=lm)
    segs = [Segment(d) for d in DOCS * 3] + [Segment(QUESTION, "user")]
    params = SamplingParams(max_tokens=8)
    eng.generate(segs, params, reuse="blend")  # computes and stores the chunks
    uniform = eng.generate(segs, params, reuse="blend", kv_bits=4)
    mixed = eng.generate(segs, params, reuse="blend", kv_bits=4, kv_alloc="mixed")
    assert mixed.prefill.reused_tokens > 0 and mixed.kv_bytes == uniform.kv_bytes
    assert "polonium" in mixed.text.lower(), mixed.text
