"""TieredStore: promotion, batched reads, prefetching, Redis outages and TTL."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from kvstash.store import (
    DEFAULT_RAM_BUDGET,
    DiskTier,
    Prefetcher,
    RamTier,
    RedisTier,
    StoreConfig,
    TieredStore,
    TierSpec,
    open_store,
    parse_size,
    parse_spec,
)
from tests.redis_server import (
    redis_url,  # noqa: F401
    skip_without_redis,
    start_server,
)
from tests.store.test_tiers import CFG, assert_same, make_chunk


def test_tiered_promotes_hits_to_faster_tiers(tmp_path: Path) -> None:
    ram, disk = RamTier(CFG, 1 << 20), DiskTier(CFG, tmp_path)
    store = TieredStore([ram, disk])
    chunk = make_chunk(1)
    key = store.key(chunk.token_ids)
    disk.put(key, chunk)  # e.g. written by an earlier run
    assert not ram.contains(key)
    assert_same(store.get(key, chunk.token_ids), chunk)
    assert ram.contains(key)
    assert_same(store.get(key, chunk.token_ids), chunk)
    r, d = store.stats()
    assert (r.name, r.hits, r.misses, r.puts) == ("ram", 1, 1, 1)
    assert (d.name, d.hits, d.misses) == ("disk", 1, 0)


def test_tiered_put_get_many_delete(tmp_path: Path) -> None:
    ram, disk = RamTier(CFG, 1 << 20), DiskTier(CFG, tmp_path)
    store = TieredStore([ram, disk])
    chunks = [make_chunk(i) for i in range(4)]
    keys = [store.key(c.token_ids) for c in chunks]
    assert store.put(keys[0], chunks[0])  # both tiers
    disk.put(keys[1], chunks[1])  # slow tier only
    got = store.get_many(keys[:3], [c.token_ids for c in chunks[:3]])
    assert_same(got[0], chunks[0])
    assert_same(got[1], chunks[1])
    assert got[2] is None
    assert ram.contains(keys[1])  # promoted
    assert sorted(store.keys()) == sorted(keys[:2])
    assert store.delete(keys[0]) and not store.contains(keys[0])
    assert [v.removed for v in store.verify()] == [0, 0]
    store.clear()
    assert list(store.keys()) == []


def test_tiered_needs_one_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one tier"):
        TieredStore([])
    with pytest.raises(ValueError, match="share one StoreConfig"):
        TieredStore([RamTier(CFG, 1 << 20), RamTier(StoreConfig("other", "fp32"), 1 << 20)])


@pytest.mark.parametrize(
    "text,size",
    [
        ("1024", 1024),
        ("4GiB", 4 << 30),
        ("500MB", 500_000_000),
        ("1.5KiB", 1536),
        ("2 tib", 2 << 40),
        ("7B", 7),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_spec_full() -> None:
    ram, disk, red = parse_spec("ram:4GiB, disk:~/.cache/kvstash/kv:50GiB ,redis://127.0.0.1:6379/0?ttl=3600")
    assert ram == TierSpec("ram", budget_bytes=4 << 30)
    assert disk == TierSpec("disk", budget_bytes=50 << 30, path=str(Path.home() / ".cache/kvstash/kv"))
    assert (red.kind, red.url, red.ttl_seconds, red.prefix) == (
        "redis",
        "redis://127.0.0.1:6379/0",
        3600,
        "kvstash:",
    )


def test_parse_spec_defaults() -> None:
    assert parse_spec("ram") == [TierSpec("ram", budget_bytes=DEFAULT_RAM_BUDGET)]
    assert parse_spec("disk:/tmp/a:b") == [TierSpec("disk", path="/tmp/a:b")]  # not a size: part of the path
    red = parse_spec("redis://h:1/2?prefix=x:&socket_keepalive=true")[0]
    assert (red.url, red.ttl_seconds, red.prefix) == ("redis://h:1/2?socket_keepalive=true", None, "x:")


def test_parse_spec_cluster() -> None:
    ram, cl, disk = parse_spec("ram, redis+cluster://10.0.0.1:7000, 10.0.0.2:7001?ttl=60&prefix=p:,disk:/kv")
    assert ram.kind == "ram" and disk == TierSpec("disk", path="/kv")
    assert cl == TierSpec(
        "redis-cluster", url="redis+cluster://10.0.0.1:7000,10.0.0.2:7001", ttl_seconds=60, prefix="p:"
    )
    (alone,) = parse_spec("redis+cluster://h:7000")
    assert (alone.url, alone.ttl_seconds, alone.prefix) == ("redis+cluster://h:7000", None, "kvstash:")
    (v6,) = parse_spec("redis+cluster://[::1]:7000,[::1]:7001")
    assert v6.url == "redis+cluster://[::1]:7000,[::1]:7001"
    tiers = parse_spec("redis+cluster://h:7000,ram:1024")  # a host named ram is a tier, not a node
    assert [t.kind for t in tiers] == ["redis-cluster", "ram"]


@pytest.mark.parametrize(
    "spec,message",
    [("redis+cluster://", "bad cluster node ''"), ("redis+cluster://h", "bad cluster node 'h'"),
     ("redis+cluster://h:99999", "bad cluster node"), ("redis+cluster://h:1?db=2", "unknown cluster option"),
     ("redis+cluster://h:1?ttl=0", "positive whole number"),
     ("redis+cluster://a:1,redis+cluster://b:2", "more than once")],
)  # fmt: skip
def test_parse_spec_cluster_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_open_store_contacts_no_cluster() -> None:
    start = time.monotonic()
    store = open_store("redis+cluster://127.0.0.1:1,127.0.0.1:2", CFG)  # nothing listens there
    (tier,) = store.tiers
    assert tier.name == "redis-cluster" and time.monotonic() - start < 1
    assert tier.get(CFG.key([1]), [1]) is None and tier.stats().errors == 2  # the get, the scan
    store.close()


@pytest.mark.parametrize(
    "spec",
    ["", " , ", "ram,", "ram:lots", "ram:0", "floppy:1GB", "disk", "disk:/x:5XB", "ram,ram", "redis://h/0?ttl=-1",
     "redis:///0", "ram:4GiB;disk:/x"],
)  # fmt: skip
def test_parse_spec_errors_show_syntax(spec: str) -> None:
    with pytest.raises(ValueError, match="comma-separated list of tiers"):
        parse_spec(spec)


def test_open_store(tmp_path: Path) -> None:
    store = open_store(f"ram:1MiB,disk:{tmp_path}/kv:10MiB", CFG)
    assert [type(t) for t in store.tiers] == [RamTier, DiskTier]
    assert [t.budget_bytes for t in store.tiers] == [1 << 20, 10 << 20]
    chunk = make_chunk(0)
    store.put(store.key(chunk.token_ids), chunk)
    assert (tmp_path / "kv" / (store.key(chunk.token_ids) + ".kv")).is_file()


def test_prefetch_returns_what_get_returns() -> None:
    store = TieredStore([RamTier(CFG, 1 << 20)])
    chunks = [make_chunk(i) for i in range(5)]
    for c in chunks[:3]:
        store.put(store.key(c.token_ids), c)
    with Prefetcher(store, max_workers=2) as pf:
        pf.start([(store.key(c.token_ids), c.token_ids) for c in chunks])
        for c in chunks:
            want = store.get(store.key(c.token_ids), c.token_ids)
            got = pf.get(store.key(c.token_ids), timeout=5)
            if want is None:
                assert got is None
            else:
                assert_same(got, want.chunk)
        assert pf.pending() == []
        with pytest.raises(KeyError, match="not prefetched"):
            pf.get(store.key(chunks[0].token_ids))


@pytest.mark.redis
def test_redis_outage_is_misses_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    skip_without_redis()
    server = start_server()
    try:
        tier = RedisTier(CFG, server.url, ttl_seconds=60, socket_timeout=0.3, retry_interval=0.0)
        chunk, later = make_chunk(1), make_chunk(2)
        key = CFG.key(chunk.token_ids)
        assert tier.put(key, chunk)
        assert_same(tier.get(key, chunk.token_ids), chunk)
        server.stop()
        with caplog.at_level(logging.WARNING, logger="kvstash.store.base"):
            start = time.monotonic()
            assert tier.get(key, chunk.token_ids) is None
            assert not tier.put(CFG.key(later.token_ids), later)
            assert tier.get_many([key], [chunk.token_ids]) == [None]
            assert not tier.contains(key) and not tier.delete(key)
            assert list(tier.keys()) == []
            s = tier.stats()
            assert time.monotonic() - start < 5
            assert (s.hits, s.misses, s.puts, s.errors, s.entries) == (1, 2, 1, 7, 0)
            assert len([r for r in caplog.records if "failed" in r.message]) == 1  # once per outage
            server.start()  # same port; the stored data is gone (no persistence)
            assert tier.put(key, chunk)
            assert_same(tier.get(key, chunk.token_ids), chunk)
            assert [r.message for r in caplog.records][-1] == "redis tier: working again"
        tier.close()
    finally:
        server.cleanup()


@pytest.mark.redis
def test_redis_ttl_and_open_store(redis_url: str) -> None:  # noqa: F811
    store = open_store(f"ram:1MiB,{redis_url}?ttl=1&prefix=kvstash-ttl-test:", CFG)
    ram, red = store.tiers
    assert isinstance(red, RedisTier) and red.ttl_seconds == 1
    chunk = make_chunk(3)
    key = store.key(chunk.token_ids)
    store.put(key, chunk)
    assert red._client.ttl("kvstash-ttl-test:" + key) == 1
    ram.clear()
    assert_same(store.get(key, chunk.token_ids), chunk)  # from redis, promoted to ram
    assert ram.contains(key)
    red.clear()
    store.close()
