"""Store codecs: dense and KIVI round trips, sizes, the registry."""

from __future__ import annotations

import math

import pytest
import torch

from kvstash.cache.kivi import (
    dequantize,
    quantize_kv,
)
from kvstash.store import (
    StoreConfig,
    get_codec,
)
from kvstash.store.chunk import ChunkKV
from kvstash.store.codec_registry import CODECS
from tests.redis_server import redis_url  # noqa: F401


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


SHAPE = (2, 3, 5, 8)  # [layers, kv_heads, tokens, head_dim]


def make_chunk(seed: int, start: int = 100, dtype: torch.dtype = torch.float32) -> ChunkKV:
    """A tiny chunk; token ids are 3-digit so every record of this shape has the same size."""
    g = torch.Generator().manual_seed(seed)
    layers, heads, tokens, dim = SHAPE
    token_ids = [start + 10 * seed + i for i in range(tokens)]
    keys = torch.randn(SHAPE, generator=g).to(dtype)
    values = torch.randn(SHAPE, generator=g).to(dtype)
    return ChunkKV(token_ids, keys, values, torch.arange(tokens, dtype=torch.int64) + 7)


@pytest.mark.parametrize("name", ["kivi8", "kivi4", "kivi2"])
def test_codec_round_trip(name: str) -> None:
    codec = CODECS[name]()
    shape = (2, 3, 45, 64)
    k = torch.randn(shape, generator=_gen(0))
    v = torch.randn(shape, generator=_gen(1))
    data = codec.encode(k, v)
    assert isinstance(data, bytes) and len(data) == codec.encoded_nbytes(shape)
    k2, v2 = codec.decode(memoryview(data), shape, torch.float16)
    assert k2.dtype == v2.dtype == torch.float16 and k2.shape == shape
    qk, qv = quantize_kv(k, v, codec.bits, codec.group_size)
    assert torch.equal(k2, dequantize(qk).half()) and torch.equal(v2, dequantize(qv).half())
    assert codec.encode(k, v) == data  # deterministic
    with pytest.raises(ValueError, match="bytes"):
        codec.decode(data[:-1], shape, torch.float32)


def test_get_codec_round_trip() -> None:
    pytest.importorskip("kvstash.store.dense_codec", reason="get_codec needs the dense codecs module")
    from kvstash.store.codec_registry import get_codec

    codec = get_codec("kivi4")
    shape = (2, 2, 64, 32)
    k, v = torch.randn(shape, generator=_gen(2)), torch.randn(shape, generator=_gen(3))
    data = codec.encode(k, v)
    assert len(data) == codec.encoded_nbytes(shape)
    k2, v2 = codec.decode(data, shape, torch.float32)
    assert (k2 - k).abs().max() < 0.5 and (v2 - v).abs().max() < 0.5


def test_codec_ratios_vs_fp16() -> None:
    shape = (30, 3, 2048, 64)  # layers, kv_heads, tokens, head_dim
    fp16 = 2 * math.prod(shape) * 2
    ratio = {n: CODECS[n]().encoded_nbytes(shape) / fp16 for n in ("kivi8", "kivi4", "kivi2")}
    assert ratio["kivi4"] <= 0.3 and ratio["kivi2"] <= 0.2, ratio
    # (bits + 32 bits of fp16 scale+zero per group of G) / 16: kivi4 uses G=64, the others G=32
    assert ratio == {"kivi8": (8 + 1) / 16, "kivi4": (4 + 0.5) / 16, "kivi2": (2 + 1) / 16}


@pytest.mark.parametrize(
    "name,store_dtype", [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]
)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_dense_codec_roundtrip(name: str, store_dtype: torch.dtype, in_dtype: torch.dtype) -> None:
    chunk = make_chunk(1, dtype=in_dtype)
    codec = get_codec(name)
    data = codec.encode(chunk.keys, chunk.values)
    assert len(data) == codec.encoded_nbytes(SHAPE) == 2 * chunk.keys.numel() * store_dtype.itemsize
    keys, values = codec.decode(data, SHAPE, in_dtype)
    assert keys.dtype == in_dtype and keys.shape == SHAPE
    # exactly the storage dtype's rounding of the input, nothing more
    assert torch.equal(keys, chunk.keys.to(store_dtype).to(in_dtype))
    assert torch.equal(values, chunk.values.to(store_dtype).to(in_dtype))


def test_codec_rejects_wrong_payload_size() -> None:
    with pytest.raises(ValueError, match="expected"):
        get_codec("fp16").decode(b"\0" * 10, SHAPE, torch.float32)


def test_unknown_codec_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="fp16"):
        StoreConfig("m", codec="nope")
