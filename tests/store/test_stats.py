"""Stats from the records themselves and counters kept with the tier: what a fresh process sees."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import struct
import uuid
from pathlib import Path

import pytest
import redis

from kvstash.store import DiskTier, RamTier, RedisTier, StoreConfig, Tier
from kvstash.store import counters as counters_mod
from kvstash.store.counters import FileCounters
from kvstash.store.record import FORMAT_VERSION, MAGIC, encode_record
from kvstash.store.scan import PREFIX_SIZE, header_end, parse_head
from tests.redis_server import redis_url  # noqa: F401
from tests.store.test_tiers import CORRUPTIONS, SHAPE, make_chunk

FP16, KIVI4 = StoreConfig("test-model", "fp16"), StoreConfig("test-model", "kivi4")
ADMIN = StoreConfig("kvstash-store-admin")  # what `kvstash store` opens tiers with


def _blob(cfg: StoreConfig, seed: int) -> bytes:
    chunk = make_chunk(seed)
    return encode_record(cfg.key(chunk.token_ids), cfg.model_fingerprint, cfg.codec, chunk)


def _open(kind: str, cfg: StoreConfig, where: str) -> Tier:
    return DiskTier(cfg, where) if kind == "disk" else RedisTier(cfg, where.split("|")[0], prefix=where.split("|")[1])


@pytest.fixture(params=["disk", pytest.param("redis", marks=pytest.mark.redis)])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(kind, where): a disk directory, or ``URL|prefix`` of a fresh key space on the session's Redis."""
    if request.param == "disk":
        return "disk", str(tmp_path / "kv")
    return "redis", f"{request.getfixturevalue('redis_url')}|kvstash-stats-{uuid.uuid4().hex[:8]}:"


def test_parse_head_needs_only_the_header_s_start() -> None:
    blob = _blob(KIVI4, 1)
    assert parse_head(blob[: PREFIX_SIZE + 200]) == (KIVI4.codec, "test-model", SHAPE[2])
    assert parse_head(blob[:PREFIX_SIZE]) is None and parse_head(b"") is None
    assert parse_head(CORRUPTIONS["garbage"](blob)) is None


def test_parse_head_reads_other_headers_whole() -> None:
    header = {"model": 'm"odd', "codec": "fp16", "key": "k", "token_ids": [1, 2, 3], "positions": [0, 1, 2]}
    raw = json.dumps(header).encode()  # another order and spacing than encode_record's
    blob = struct.pack("<8sHI", MAGIC, FORMAT_VERSION, len(raw)) + raw + b"payload"
    assert header_end(blob) == PREFIX_SIZE + len(raw)
    assert parse_head(blob) == ("fp16", 'm"odd', 3)
    assert parse_head(blob[: PREFIX_SIZE + 20]) is None  # not all of it: cannot tell


def test_stats_come_from_the_records_per_codec(shared: tuple[str, str]) -> None:
    kind, where = shared
    fp16, kivi4 = _open(kind, FP16, where), _open(kind, KIVI4, where)
    for seed in range(3):
        assert fp16.put_blob(FP16.key(make_chunk(seed).token_ids), _blob(FP16, seed))
    for seed in range(2):
        assert kivi4.put_blob(KIVI4.key(make_chunk(seed).token_ids), _blob(KIVI4, seed))
    fp16.close()
    kivi4.close()
    fresh = _open(kind, ADMIN, where)  # another process would open it the same way
    s = fresh.stats()
    size16, size4 = len(_blob(FP16, 0)), len(_blob(KIVI4, 0))
    assert (s.entries, s.bytes, s.tokens, s.unreadable) == (5, 3 * size16 + 2 * size4, 5 * SHAPE[2], 0)
    assert s.bytes_per_token == (3 * size16 + 2 * size4) / (5 * SHAPE[2])
    assert sorted(s.codecs) == ["fp16", "kivi4"]
    assert (s.codecs["fp16"].entries, s.codecs["fp16"].bytes_per_token) == (3, size16 / SHAPE[2])
    assert (s.codecs["kivi4"].entries, s.codecs["kivi4"].bytes_per_token) == (2, size4 / SHAPE[2])
    assert s.puts == 5 and s.counters == "shared"
    fresh.clear()
    fresh.close()


def test_counters_are_shared_between_tier_objects(shared: tuple[str, str]) -> None:
    kind, where = shared
    one, two = _open(kind, FP16, where), _open(kind, FP16, where)
    chunk = make_chunk(1)
    key = FP16.key(chunk.token_ids)
    one.put(key, chunk)
    assert one.get(key, chunk.token_ids) is not None
    assert two.get(FP16.key([1, 2]), [1, 2]) is None
    two._write(key, CORRUPTIONS["truncated"](_blob(FP16, 1)))  # damaged behind one's back
    assert one.get(key, chunk.token_ids) is None
    assert (one.stats().hits, one.stats().misses) == (1, 1)  # one's own counts show before any push
    two.close()  # pushes two's miss
    s = one.stats()
    assert (s.puts, s.hits, s.misses, s.corrupt, s.errors, s.entries) == (1, 1, 2, 1, 0, 0)
    one.close()
    s = _open(kind, ADMIN, where).stats()
    assert (s.puts, s.hits, s.misses, s.corrupt) == (1, 1, 2, 1)


def test_ram_counters_are_the_process_s(tmp_path: Path) -> None:
    ram = RamTier(FP16, 1 << 20)
    chunk = make_chunk(0)
    ram.put(FP16.key(chunk.token_ids), chunk)
    s = ram.stats()
    assert (s.counters, s.puts, s.entries, s.tokens) == ("process", 1, 1, SHAPE[2])
    assert s.bytes_per_token == len(_blob(FP16, 0)) / SHAPE[2]
    assert DiskTier(FP16, tmp_path).stats().counters == "shared"


@pytest.mark.redis
def test_redis_counters_hash_is_beside_the_records_not_among_them(redis_url: str) -> None:  # noqa: F811
    prefix = f"kvstash-stats-{uuid.uuid4().hex[:8]}:"
    tier = RedisTier(FP16, redis_url, prefix=prefix)
    chunk = make_chunk(2)
    tier.put(FP16.key(chunk.token_ids), chunk)
    tier.counters.flush()
    client = redis.Redis.from_url(redis_url)
    assert client.hgetall(prefix + "@counters") == {b"puts": b"1"}
    assert list(tier.keys()) == [FP16.key(chunk.token_ids)]
    assert tier.verify() == (1, 1, 0)
    tier.clear()
    assert list(tier.keys()) == [] and client.exists(prefix + "@counters")
    client.delete(prefix + "@counters")
    client.close()
    tier.close()


def test_disk_counters_file_and_what_a_damaged_one_does(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tier = DiskTier(FP16, tmp_path)
    tier.get(FP16.key([5]), [5])
    assert not (tmp_path / FileCounters.FILE).exists()  # batched: one miss is not pushed yet
    tier.close()
    assert json.loads((tmp_path / FileCounters.FILE).read_text())["misses"] == 1
    (tmp_path / FileCounters.FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="kvstash.store.counters"):
        assert DiskTier(FP16, tmp_path).stats().misses == 0
    assert "damaged" in caplog.text and "from zero" in caplog.text


def test_pushes_are_batched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(counters_mod, "FLUSH_SECONDS", 3600.0)
    tier = DiskTier(FP16, tmp_path)
    for i in range(counters_mod.FLUSH_EVERY - 1):
        tier.get(FP16.key([i]), [i])
    assert not (tmp_path / FileCounters.FILE).exists()
    tier.get(FP16.key([999]), [999])  # the FLUSH_EVERY-th event pushes
    assert json.loads((tmp_path / FileCounters.FILE).read_text())["misses"] == counters_mod.FLUSH_EVERY


def count_in_child(root: str, events: int, start) -> None:
    """Child process: ``events`` misses and hits on a shared directory, pushing every 3 events."""
    counters_mod.FLUSH_EVERY = 3
    tier = DiskTier(FP16, root)
    chunk = make_chunk(7)
    key = FP16.key(chunk.token_ids)
    tier.put(key, chunk)
    start.wait(timeout=60)  # both count at once
    for i in range(events):
        assert tier.get(key, chunk.token_ids) is not None
        assert tier.get(FP16.key([i]), [i]) is None
    tier.close()


def test_two_processes_counting_at_once_lose_nothing(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    events = 400
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=count_in_child, args=(str(tmp_path), events, start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    s = DiskTier(ADMIN, tmp_path).stats()
    assert (s.hits, s.misses, s.puts, s.errors, s.entries) == (2 * events, 2 * events, 2, 0, 1)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_long_unusual_header_is_read_whole_and_damage_is_unreadable(shared: tuple[str, str]) -> None:
    kind, where = shared
    tier = _open(kind, ADMIN, where)
    n = 600  # a header of several KiB, key order unlike encode_record's: the scan's second read
    header = {"model": "m", "codec": "kivi2", "key": "k", "token_ids": list(range(n)), "positions": list(range(n))}
    raw = json.dumps(header).encode()
    blob = struct.pack("<8sHI", MAGIC, FORMAT_VERSION, len(raw)) + raw + b"\0" * 100
    tier._write("a" * 32, blob)
    tier._write("b" * 32, b"not a record at all")
    s = tier.stats()
    assert (s.entries, s.bytes, s.tokens, s.unreadable) == (2, len(blob) + 19, n, 1)
    assert s.codecs["kivi2"].bytes_per_token == len(blob) / n and s.bytes_per_token == len(blob) / n
    tier.clear()
    tier.close()
