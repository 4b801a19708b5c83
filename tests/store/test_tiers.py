"""Records, keys and one matrix over every tier: put/get, stats, corruption, bad keys."""

from __future__ import annotations

import struct
import uuid

import pytest
import torch
import xxhash

from kvstash.store import (
    FORMAT_VERSION,
    CorruptRecord,
    DiskTier,
    Hit,
    RamTier,
    RedisTier,
    StoreConfig,
    Tier,
    chunk_key,
    decode_record,
    encode_record,
)
from kvstash.store.chunk import ChunkKV
from tests.redis_server import redis_url  # noqa: F401

SHAPE = (2, 3, 5, 8)  # [layers, kv_heads, tokens, head_dim]


CFG = StoreConfig(model_fingerprint="test-model", codec="fp32")


def make_chunk(seed: int, start: int = 100, dtype: torch.dtype = torch.float32) -> ChunkKV:
    """A tiny chunk; token ids are 3-digit so every record of this shape has the same size."""
    g = torch.Generator().manual_seed(seed)
    layers, heads, tokens, dim = SHAPE
    token_ids = [start + 10 * seed + i for i in range(tokens)]
    keys = torch.randn(SHAPE, generator=g).to(dtype)
    values = torch.randn(SHAPE, generator=g).to(dtype)
    return ChunkKV(token_ids, keys, values, torch.arange(tokens, dtype=torch.int64) + 7)


def assert_same(got: Hit | ChunkKV | None, b: ChunkKV) -> None:
    """``got`` (a chunk, or what a read returned) holds exactly chunk ``b``."""
    assert got is not None
    a = got.chunk if isinstance(got, Hit) else got
    assert a.token_ids == b.token_ids
    assert a.keys.dtype == b.keys.dtype
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert torch.equal(a.positions, b.positions)


def blob_of(chunk: ChunkKV, cfg: StoreConfig = CFG) -> bytes:
    return encode_record(cfg.key(chunk.token_ids), cfg.model_fingerprint, cfg.codec, chunk)


def _with_version(blob: bytes, version: int) -> bytes:
    body = blob[:8] + struct.pack("<H", version) + blob[10:-8]
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))  # a valid checksum: only the version is off


CORRUPTIONS = {
    "empty": lambda b: b"",
    "truncated": lambda b: b[: len(b) // 2],
    "last_byte_cut": lambda b: b[:-1],
    "flipped_payload": lambda b: b[:-40] + bytes([b[-40] ^ 0x01]) + b[-39:],
    "flipped_header": lambda b: b[:30] + bytes([b[30] ^ 0x20]) + b[31:],
    "garbage": lambda b: bytes(range(256)) * 4,
    "foreign_json": lambda b: b'{"hello": "world"}' * 3,
    "wrong_version": lambda b: _with_version(b, FORMAT_VERSION + 1),
    "other_key": lambda b: blob_of(make_chunk(9)),
}


REASONS = {"empty": "truncated", "garbage": "magic", "foreign_json": "magic", "wrong_version": "version"}


REASONS |= {"other_key": "key"}


TIERS = ["ram", "disk", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=TIERS)
def tier(request: pytest.FixtureRequest, tmp_path) -> Tier:
    if request.param == "ram":
        t: Tier = RamTier(CFG, budget_bytes=1 << 20)
    elif request.param == "disk":
        t = DiskTier(CFG, tmp_path / "kv", budget_bytes=1 << 20)
    else:
        url = request.getfixturevalue("redis_url")
        t = RedisTier(CFG, url, prefix=f"kvstash-test-{uuid.uuid4().hex[:8]}:")
    yield t
    t.clear()
    t.close()


def test_record_roundtrip_and_key_check() -> None:
    chunk = make_chunk(2)
    key = CFG.key(chunk.token_ids)
    record = decode_record(blob_of(chunk), expect_key=key)
    assert (record.key, record.model_fingerprint, record.codec) == (key, "test-model", "fp32")
    assert_same(record.chunk, chunk)
    with pytest.raises(CorruptRecord) as err:
        decode_record(blob_of(chunk), expect_key=CFG.key([1, 2, 3]))
    assert err.value.reason == "key"


@pytest.mark.parametrize("mode", sorted(CORRUPTIONS))
def test_decode_record_detects(mode: str) -> None:
    chunk = make_chunk(3)
    bad = CORRUPTIONS[mode](blob_of(chunk))
    with pytest.raises(CorruptRecord) as err:
        decode_record(bad, expect_key=CFG.key(chunk.token_ids))
    assert err.value.reason == REASONS.get(mode, "checksum")
    assert isinstance(err.value, ValueError)


def test_chunk_key_is_stable_and_distinct() -> None:
    # pinned: another process, machine or Python run must give the same key (no hash() randomization);
    # the record format version is hashed in, so format 2 records never share a key with format 1 ones
    assert chunk_key("m", [1, 2, 3], "fp16") == "dde3546bd2b8df839884a5ef48acb187"
    base = chunk_key("m", [1, 2, 3], "fp16")
    others = [chunk_key("m2", [1, 2, 3], "fp16"), chunk_key("m", [1, 2, 3], "fp32")]
    others += [chunk_key("m", [3, 2, 1], "fp16"), chunk_key("m", [1, 2], "fp16"), chunk_key("m", [], "fp16")]
    assert len({base, *others}) == 6
    assert chunk_key("m", torch.tensor([1, 2, 3]).tolist(), "fp16") == base


def test_tier_put_get_contains_delete(tier: Tier) -> None:
    chunk = make_chunk(1)
    key = CFG.key(chunk.token_ids)
    assert not tier.contains(key) and tier.get(key, chunk.token_ids) is None
    assert tier.put(key, chunk)
    assert tier.contains(key)
    assert_same(tier.get(key, chunk.token_ids), chunk)
    assert tier.delete(key) and not tier.delete(key)
    assert not tier.contains(key) and tier.get(key, chunk.token_ids) is None
    s = tier.stats()
    assert (s.name, s.entries, s.bytes, s.hits, s.misses, s.puts) == (tier.name, 0, 0, 1, 2, 1)
    assert (s.corrupt, s.errors, s.evictions, s.rejected) == (0, 0, 0, 0)


def test_tier_stats_bytes_and_iteration(tier: Tier) -> None:
    chunks = [make_chunk(i) for i in range(3)]
    keys = [CFG.key(c.token_ids) for c in chunks]
    for key, chunk in zip(keys, chunks, strict=True):
        tier.put(key, chunk)
    s = tier.stats()
    size = len(blob_of(chunks[0]))
    assert (s.entries, s.bytes) == (3, 3 * size)
    assert s.bytes_per_token == size / SHAPE[2]
    assert sorted(tier.keys()) == sorted(keys)
    tier.clear()
    assert list(tier.keys()) == [] and tier.stats().entries == 0


def test_tier_token_id_mismatch_is_a_miss(tier: Tier) -> None:
    chunk = make_chunk(4)
    key = CFG.key(chunk.token_ids)
    tier.put(key, chunk)
    assert tier.get(key, chunk.token_ids[::-1]) is None
    assert tier.get(key, chunk.token_ids[:-1]) is None
    s = tier.stats()
    assert (s.hits, s.misses, s.corrupt, s.entries) == (0, 2, 0, 1)  # kept: the record itself is fine
    assert_same(tier.get(key, torch.tensor(chunk.token_ids)), chunk)


def test_tier_get_many(tier: Tier) -> None:
    chunks = [make_chunk(i) for i in range(4)]
    keys = [CFG.key(c.token_ids) for c in chunks]
    for i in (0, 2):
        tier.put(keys[i], chunks[i])
    got = tier.get_many(keys, [c.token_ids for c in chunks])
    assert got[1] is None and got[3] is None
    assert_same(got[0], chunks[0])
    assert_same(got[2], chunks[2])
    assert (tier.stats().hits, tier.stats().misses) == (2, 2)
    assert tier.get_many([], []) == []
    with pytest.raises(ValueError, match="token-id lists"):
        tier.get_many(keys, [])


@pytest.mark.parametrize("mode", sorted(CORRUPTIONS))
def test_tier_corrupt_record_is_a_counted_miss(tier: Tier, mode: str) -> None:
    chunk, other = make_chunk(5), make_chunk(6)
    key = CFG.key(chunk.token_ids)
    tier.put(CFG.key(other.token_ids), other)
    tier._write(key, CORRUPTIONS[mode](blob_of(chunk)))  # what a damaged disk or a foreign writer leaves
    assert tier.get(key, chunk.token_ids) is None  # never an exception, never a wrong KV
    s = tier.stats()
    assert (s.corrupt, s.misses, s.hits) == (1, 1, 0)
    assert not tier.contains(key)  # removed
    assert_same(tier.get(CFG.key(other.token_ids), other.token_ids), other)


def test_tier_verify_removes_corrupt(tier: Tier) -> None:
    good, bad = make_chunk(7), make_chunk(8)
    tier.put(CFG.key(good.token_ids), good)
    tier._write(CFG.key(bad.token_ids), CORRUPTIONS["flipped_payload"](blob_of(bad)))
    result = tier.verify()
    assert (result.checked, result.ok, result.removed) == (2, 1, 1)
    assert tier.stats().corrupt == 1
    assert list(tier.keys()) == [CFG.key(good.token_ids)]


def test_tier_rejects_bad_keys(tier: Tier) -> None:
    for bad in ["", "../etc/passwd", "a b", "x" * 129]:
        with pytest.raises(ValueError, match="chunk_key"):
            tier.get(bad, [1])


def test_fp16_store_shrinks_records_and_rounds_like_fp16() -> None:
    cfg16 = StoreConfig("test-model", codec="fp16")
    chunk = make_chunk(1)
    ram32, ram16 = RamTier(CFG, 1 << 20), RamTier(cfg16, 1 << 20)
    ram32.put(CFG.key(chunk.token_ids), chunk)
    ram16.put(cfg16.key(chunk.token_ids), chunk)
    assert ram16.stats().bytes == len(blob_of(chunk, cfg16))
    assert ram32.stats().bytes - ram16.stats().bytes >= 2 * chunk.keys.numel() * 2  # K and V, 2 bytes saved each
    got = ram16.get(cfg16.key(chunk.token_ids), chunk.token_ids).chunk
    assert got.keys.dtype == torch.float32
    assert torch.equal(got.keys, chunk.keys.half().float())
