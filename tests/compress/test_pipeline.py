"""Compression after prefill: option checks, bytes reported, composition with blending and packed stores."""

from __future__ import annotations

import math

import pytest
import torch

from kvstash.cache.kv import KVCache
from kvstash.cache.quantized import QuantizedKVCache, quantize_cache
from kvstash.compress.pipeline import Compression
from kvstash.engine import Engine, EngineConfig
from kvstash.prompt import Segment
from kvstash.sampling import SamplingParams

DOCS = [
    "Marie Curie discovered polonium and radium together with Pierre Curie.",
    "The Danube flows through Vienna, Bratislava, Budapest and Belgrade.",
]


QUESTION = "Which elements did Marie Curie discover?"


def _segments() -> list[Segment]:
    return [Segment(d) for d in DOCS] + [Segment(QUESTION, "user")]


def _kept(engine: Engine, ratio: float) -> KVCache:
    pre = engine.prefill(engine.plan(_segments()), evict=f"snapkv:{ratio}")
    assert pre.cache.length == round(ratio * len(engine.plan(_segments())))
    return pre.cache


def test_compression_parse_errors() -> None:
    with pytest.raises(ValueError, match="kv-bits must be one of 2, 4, 8, 16"):
        Compression.parse(kv_bits=3)
    with pytest.raises(ValueError, match="cannot be combined"):
        Compression.parse(kv_bits=4, evict="h2o:0.5:decode")
    with pytest.raises(ValueError, match="unknown eviction policy"):
        Compression.parse(evict="random:0.5")
    assert Compression.parse(8, "snapkv:0.5").kv_bits == 8


def test_engine_reports_compressed_kv_bytes(engine) -> None:
    params = SamplingParams(max_tokens=2)
    full = engine.generate(_segments(), params)
    n = full.prompt_tokens
    assert (
        full.kv_bytes
        == full.summary()["kv_bytes"]
        == 2 * engine.runner.num_layers * engine.runner.kv_heads * n * 64 * 4
    )
    q2 = engine.generate(_segments(), params, kv_bits=2)  # 71 tokens: one group of 32 quantized, 39 in fp16
    pre = engine.prefill(engine.plan(_segments()), kv_bits=2)
    assert isinstance(pre.cache, QuantizedKVCache) and q2.kv_bytes == pre.cache.nbytes < full.kv_bytes / 2
    ev = engine.generate(_segments(), params, evict="snapkv:0.5", kv_bits=8)
    assert math.isclose(ev.kv_bytes, quantize_cache(_kept(engine, 0.5), 8).nbytes)


def test_blend_over_a_kivi4_store(engine, lm) -> None:
    """Chunks stored packed (kivi4), blended into the prompt, then the decode cache compressed too."""
    eng = Engine(EngineConfig(store="ram:64MiB", codec="kivi4"), loaded=lm)
    params = SamplingParams(max_tokens=10)
    first = eng.generate(_segments(), params, reuse="blend")  # computes the chunks and stores them
    again = eng.generate(_segments(), params, reuse="blend")  # now they come from the packed store
    assert again.prefill.reused_tokens > 0 and again.prefill.tier_hits.get("ram", 0) >= 2
    for r in (first, again):
        assert "polonium" in r.text.lower() and "radium" in r.text.lower(), r.text
    both = eng.generate(_segments(), params, reuse="blend", kv_bits=8)
    assert "polonium" in both.text.lower() and both.kv_bytes < again.kv_bytes / 2, both.text


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
