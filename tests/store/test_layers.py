"""Reading chunk KV a layer at a time (format 2): equal to a whole get for every codec, from every tier;
damage, truncation, stale keys, format 1 records and outages are counted and never served; promotion."""

from __future__ import annotations

import json
import os
import struct
import uuid

import pytest
import torch
import xxhash

from kvstash.store import DiskTier, RamTier, RedisClusterTier, RedisTier, StoreConfig, Tier, TieredStore
from kvstash.store.chunk import ChunkKV
from kvstash.store.codec_registry import CODECS, get_codec
from kvstash.store.layers import LayerReader, LayerReadError
from kvstash.store.record import (
    MAGIC,
    CorruptRecord,
    RecordHeader,
    decode_layer,
    encode_record,
    layer_range,
    parse_record_head,
)
from tests.redis_cluster import redis_cluster  # noqa: F401
from tests.redis_server import redis_url, skip_without_redis, start_server  # noqa: F401

SHAPE = (8, 2, 16, 64)  # [layers, kv_heads, tokens, head_dim]: 16 KiB per fp32 layer, past the 16 KiB head read
CFG = StoreConfig("test-model", codec="fp32")


def make_chunk(seed: int, shape: tuple[int, int, int, int] = SHAPE) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    tokens = shape[2]
    ids = [1000 + 100 * seed + i for i in range(tokens)]
    keys, values = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return ChunkKV(ids, keys, values, torch.arange(tokens, dtype=torch.int64) + 3)


def blob_of(chunk: ChunkKV, cfg: StoreConfig = CFG, model: str | None = None) -> bytes:
    return encode_record(cfg.key(chunk.token_ids), model or cfg.model_fingerprint, cfg.codec, chunk)


def header_of(blob: bytes) -> RecordHeader:
    header = parse_record_head(blob).header
    assert header is not None
    return header


def flip(blob: bytes, offset: int) -> bytes:
    return blob[:offset] + bytes([blob[offset] ^ 0x01]) + blob[offset + 1 :]


def v1_blob(key: str, cfg: StoreConfig, chunk: ChunkKV) -> bytes:
    """A record exactly as format 1 wrote it: one payload for all layers, one checksum."""
    payload = get_codec(cfg.codec).encode(chunk.keys, chunk.values)
    header = {"key": key, "model": cfg.model_fingerprint, "codec": cfg.codec, "dtype": "float32",
              "shape": list(chunk.keys.shape), "token_ids": chunk.token_ids, "positions": chunk.positions.tolist(),
              "payload_nbytes": len(payload)}  # fmt: skip
    raw = json.dumps(header, separators=(",", ":")).encode()
    body = struct.pack("<8sHI", MAGIC, 1, len(raw)) + raw + payload
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def read_all(reader: LayerReader, order: list[int] | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {i: reader.layer(i) for i in (order or range(reader.num_layers))}


def assert_layers_equal(got: dict[int, tuple[torch.Tensor, torch.Tensor]], chunk: ChunkKV) -> None:
    for i, (k, v) in got.items():
        assert k.dtype == chunk.keys.dtype and k.shape == chunk.keys.shape[1:]
        assert torch.equal(k, chunk.keys[i]) and torch.equal(v, chunk.values[i])


def counts(tier: Tier) -> tuple[int, int, int, int]:
    s = tier.stats()
    return s.hits, s.misses, s.corrupt, s.errors


# --- the record format -----------------------------------------------------------------------------


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_layer_blocks_decode_to_the_slices_of_a_whole_get(codec: str) -> None:
    cfg = StoreConfig("test-model", codec=codec)
    tier = RamTier(cfg, 1 << 22)
    chunk = make_chunk(1)
    key = cfg.key(chunk.token_ids)
    assert tier.put(key, chunk)
    whole = tier.get(key, chunk.token_ids).chunk
    header = header_of(tier.blob(key))
    layer_nbytes = get_codec(codec).encoded_nbytes((1, *SHAPE[1:]))
    assert (header.layer_nbytes, header.payload_nbytes) == (layer_nbytes, SHAPE[0] * layer_nbytes)
    assert len(tier.blob(key)) == header.payload_offset + header.payload_nbytes + 8
    with tier.open_layers(key, chunk.token_ids) as reader:
        got = read_all(reader, order=[7, 0, 3, 1, 2, 6, 5, 4])  # any order
    assert_layers_equal(got, whole)
    assert (reader.key, reader.tier, reader.token_ids, reader.shape, reader.dtype, reader.num_layers) == (
        key, "ram", chunk.token_ids, SHAPE, torch.float32, SHAPE[0])  # fmt: skip
    assert torch.equal(reader.positions, chunk.positions) and reader.positions.dtype == torch.int64
    assert (tier.stats().hits, tier.stats().misses) == (2, 0)


def test_parse_record_head_says_how_many_bytes_it_still_needs() -> None:
    blob = blob_of(make_chunk(2))
    header = header_of(blob)
    assert parse_record_head(blob[:5]) == (None, 14 - 5)
    assert parse_record_head(blob[:20]) == (None, header.payload_offset - 20)
    assert parse_record_head(blob[: header.payload_offset]).header == header
    assert layer_range(header, 3) == (header.payload_offset + 3 * header.layer_nbytes, header.layer_nbytes)
    with pytest.raises(ValueError, match="has 8 layers"):
        layer_range(header, 8)
    with pytest.raises(CorruptRecord) as err:
        parse_record_head(flip(blob, 30))
    assert err.value.reason == "checksum"
    with pytest.raises(CorruptRecord) as err:
        parse_record_head(v1_blob(header.key, CFG, make_chunk(2)))
    assert err.value.reason == "version"


def test_decode_layer_checks_the_block_sum() -> None:
    blob = blob_of(make_chunk(3))
    header = header_of(blob)
    offset, length = layer_range(header, 2)
    k, v = decode_layer(header, 2, blob[offset : offset + length])
    assert torch.equal(k, make_chunk(3).keys[2]) and torch.equal(v, make_chunk(3).values[2])
    with pytest.raises(CorruptRecord) as err:
        decode_layer(header, 2, flip(blob, offset + 9)[offset : offset + length])
    assert err.value.reason == "checksum"
    with pytest.raises(CorruptRecord) as err:
        decode_layer(header, 2, blob[offset : offset + length - 1])
    assert err.value.reason == "truncated"


# --- every tier ------------------------------------------------------------------------------------


TIERS = ["ram", "disk", pytest.param("redis", marks=pytest.mark.redis),
         pytest.param("redis-cluster", marks=pytest.mark.redis)]  # fmt: skip


@pytest.fixture(params=TIERS)
def tier(request: pytest.FixtureRequest, tmp_path) -> Tier:
    prefix = f"kvstash-layers-{uuid.uuid4().hex[:8]}:"
    if request.param == "ram":
        t: Tier = RamTier(CFG, budget_bytes=1 << 24)
    elif request.param == "disk":
        t = DiskTier(CFG, tmp_path / "kv")
    elif request.param == "redis":
        t = RedisTier(CFG, request.getfixturevalue("redis_url"), prefix=prefix, ttl_seconds=60)
    else:
        url = request.getfixturevalue("redis_cluster").url  # a fresh cluster: a fixed prefix spreads the same way
        t = RedisClusterTier(CFG, url, prefix="kvstash-layers:", ttl_seconds=60)
    yield t
    t.clear()
    t.close()


def test_open_and_read_every_layer(tier: Tier, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [make_chunk(i) for i in range(6)]  # several records: a cluster holds them on each of its 3 nodes
    keys = [CFG.key(c.token_ids) for c in chunks]
    for key, chunk in zip(keys, chunks, strict=True):
        assert tier.put(key, chunk)
    header = header_of(tier.blob(keys[0]))
    if isinstance(tier, RedisTier):
        assert len({tier._where(tier._rkey(k)) for k in keys}) == (3 if isinstance(tier, RedisClusterTier) else 1)
        for key in keys:
            tier._client.expire(tier._rkey(key), 5)
    ranges: list[tuple[int, int, bool]] = []
    read_range = tier._read_range
    monkeypatch.setattr(tier, "_read_range", lambda k, o, n, touch=False: ranges.append((o, n, touch)) or
                        read_range(k, o, n, touch))  # fmt: skip
    if tier.name != "ram":  # ram's ranges are slices of its stored bytes; the others never read a whole record
        monkeypatch.setattr(tier, "_read", lambda *a, **k: pytest.fail("a whole-record read"))
    for key, chunk in zip(keys, chunks, strict=True):
        ranges.clear()
        with tier.open_layers(key, chunk.token_ids) as reader:
            assert reader.tier == tier.name
            assert_layers_equal(read_all(reader), chunk)
        blocks = [(*layer_range(header, i), False) for i in range(SHAPE[0])]
        assert ranges == [(0, 16 * 1024, True), *blocks[:-1], (blocks[-1][0], blocks[-1][1] + 8, False)]
        if isinstance(tier, RedisTier):
            assert tier._client.ttl(tier._rkey(key)) == 60  # the open refreshed it
    assert counts(tier) == (6, 0, 0, 0)


def test_open_reads_a_header_longer_than_the_first_range_read(tier: Tier) -> None:
    chunk = make_chunk(4, shape=(2, 1, 3000, 2))  # token ids and positions make a ~30 KiB header
    key = CFG.key(chunk.token_ids)
    tier.put(key, chunk)
    assert header_of(tier.blob(key)).payload_offset > 16 * 1024
    with tier.open_layers(key, chunk.token_ids) as reader:
        assert_layers_equal(read_all(reader), chunk)
    assert counts(tier) == (1, 0, 0, 0)


def test_a_flipped_byte_in_block_5_fails_layer_5_only(tier: Tier) -> None:
    chunk = make_chunk(5)
    key = CFG.key(chunk.token_ids)
    blob = blob_of(chunk)
    offset, length = layer_range(header_of(blob), 5)
    tier._write(key, flip(blob, offset + length // 2))
    reader = tier.open_layers(key, chunk.token_ids)
    assert_layers_equal(read_all(reader, order=[0, 1, 2, 3, 4]), chunk)
    with pytest.raises(LayerReadError) as err:
        reader.layer(5)
    assert err.value.reason == "checksum"
    assert not tier.contains(key)  # removed
    with pytest.raises(LayerReadError) as err:
        reader.layer(6)
    assert err.value.reason == "failed"
    reader.close()
    assert counts(tier) == (1, 0, 1, 0)


def test_wrong_token_ids_or_model_is_a_miss_and_the_record_stays(tier: Tier) -> None:
    chunk = make_chunk(6)
    key = CFG.key(chunk.token_ids)
    tier.put(key, chunk)
    assert tier.open_layers(key, chunk.token_ids[::-1]) is None
    assert tier.open_layers(key, chunk.token_ids[:-1]) is None
    tier._write(key, blob_of(chunk, model="other-model"))
    assert tier.open_layers(key, chunk.token_ids) is None
    assert counts(tier) == (0, 3, 0, 0)
    assert tier.contains(key)


def test_a_format_1_record_or_a_damaged_header_is_corrupt_removed_and_none(tier: Tier) -> None:
    chunk, other = make_chunk(7), make_chunk(8)
    key, other_key = CFG.key(chunk.token_ids), CFG.key(other.token_ids)
    tier._write(key, v1_blob(key, CFG, chunk))
    assert tier.open_layers(key, chunk.token_ids) is None
    assert not tier.contains(key)
    tier._write(key, flip(blob_of(chunk), 40))  # inside the JSON header
    assert tier.open_layers(key, chunk.token_ids) is None
    tier._write(key, blob_of(chunk)[:100])  # cut inside the header
    assert tier.open_layers(key, chunk.token_ids) is None
    tier._write(other_key, blob_of(chunk))  # another key's record
    assert tier.open_layers(other_key, other.token_ids) is None
    assert tier.open_layers(key, chunk.token_ids) is None  # absent: a plain miss
    assert counts(tier) == (0, 5, 4, 0)
    assert list(tier.keys()) == []


# --- disk and Redis failures ---------------------------------------------------------------------


def test_a_truncated_or_vanished_disk_file(tmp_path) -> None:
    tier = DiskTier(CFG, tmp_path)
    chunk = make_chunk(9)
    key = CFG.key(chunk.token_ids)
    tier.put(key, chunk)
    offset, _ = layer_range(header_of(tier.blob(key)), 6)
    os.truncate(tmp_path / f"{key}.kv", offset + 100)  # cut inside block 6
    reader = tier.open_layers(key, chunk.token_ids)
    assert_layers_equal(read_all(reader, order=[0, 1, 2, 3, 4, 5]), chunk)
    with pytest.raises(LayerReadError) as err:
        reader.layer(6)
    assert err.value.reason == "truncated"
    assert not (tmp_path / f"{key}.kv").exists()
    assert counts(tier) == (1, 0, 1, 0)
    tier.put(key, chunk)
    reader = tier.open_layers(key, chunk.token_ids)
    (tmp_path / f"{key}.kv").unlink()  # evicted by another process meanwhile: nothing is wrong
    with pytest.raises(LayerReadError) as err:
        reader.layer(0)
    assert err.value.reason == "gone"
    assert counts(tier) == (2, 0, 1, 0)


@pytest.mark.redis
def test_redis_stopped_after_open_is_a_counted_layer_error() -> None:
    skip_without_redis()
    server = start_server()
    try:
        tier = RedisTier(CFG, server.url, ttl_seconds=60, socket_timeout=0.3, retry_interval=0.0)
        chunk = make_chunk(10)
        key = CFG.key(chunk.token_ids)
        assert tier.put(key, chunk)
        reader = tier.open_layers(key, chunk.token_ids)
        assert_layers_equal(read_all(reader, order=[0]), chunk)
        server.stop()
        with pytest.raises(LayerReadError) as err:
            reader.layer(1)
        assert err.value.reason == "backend"
        assert tier.counters.totals()["errors"] == 1
        assert (tier.counters.totals()["hits"], tier.counters.totals()["corrupt"]) == (1, 0)
        reader.close()
        tier.close()
    finally:
        server.cleanup()


# --- TieredStore -----------------------------------------------------------------------------------


def test_tiered_promotes_after_a_complete_layered_read_only(tmp_path) -> None:
    ram, disk = RamTier(CFG, 1 << 24), DiskTier(CFG, tmp_path)
    store = TieredStore([ram, disk])
    chunk = make_chunk(11)
    key = store.key(chunk.token_ids)
    disk.put(key, chunk)
    with store.open_layers(key, chunk.token_ids) as reader:
        assert reader.tier == "disk"
        read_all(reader, order=list(range(7)))  # all but the last layer
    assert not ram.contains(key)  # a partial read promotes nothing
    reader = store.open_layers(key, chunk.token_ids)
    assert_layers_equal(read_all(reader, order=[7, 6, 5, 4, 3, 2, 1, 0]), chunk)
    assert not ram.contains(key)  # promotion happens in close()
    reader.close()
    assert ram.blob(key) == disk.blob(key)  # the exact record
    with store.open_layers(key, chunk.token_ids) as reader:
        assert reader.tier == "ram"
        assert_layers_equal(read_all(reader), chunk)
    assert [(s.name, s.hits, s.misses, s.puts, s.corrupt) for s in store.stats()] == [
        ("ram", 1, 2, 1, 0), ("disk", 2, 0, 1, 0)]  # fmt: skip


def test_tiered_does_not_promote_a_record_whose_closing_checksum_fails(tmp_path) -> None:
    ram, disk = RamTier(CFG, 1 << 24), DiskTier(CFG, tmp_path)
    store = TieredStore([ram, disk])
    chunk = make_chunk(12)
    key = store.key(chunk.token_ids)
    blob = blob_of(chunk)
    disk._write(key, flip(blob, len(blob) - 3))  # the closing checksum itself
    with store.open_layers(key, chunk.token_ids) as reader:
        assert_layers_equal(read_all(reader), chunk)  # every block is intact
    assert not ram.contains(key) and not disk.contains(key)
    assert [(s.name, s.hits, s.misses, s.corrupt) for s in store.stats()] == [("ram", 0, 1, 0), ("disk", 1, 0, 1)]


def test_a_failed_layer_promotes_nothing_and_closed_readers_refuse(tmp_path) -> None:
    ram, disk = RamTier(CFG, 1 << 24), DiskTier(CFG, tmp_path)
    store = TieredStore([ram, disk])
    chunk = make_chunk(13)
    key = store.key(chunk.token_ids)
    blob = blob_of(chunk)
    disk._write(key, flip(blob, layer_range(header_of(blob), 7)[0]))
    reader = store.open_layers(key, chunk.token_ids)
    read_all(reader, order=list(range(7)))
    with pytest.raises(LayerReadError):
        reader.layer(7)
    reader.close()
    assert not ram.contains(key) and not disk.contains(key)
    with pytest.raises(ValueError, match="closed"):
        reader.layer(0)
    assert store.open_layers(key, chunk.token_ids) is None
