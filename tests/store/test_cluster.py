"""The Redis Cluster tier against a real 3-node cluster: records spread over nodes, batched reads across
slots, shared stats, a node killed mid-run and restarted, an engine's answer through it all."""

from __future__ import annotations

import logging
import time
import uuid

import pytest

from kvstash.engine import Engine
from kvstash.store import RedisClusterTier, open_store
from tests.redis_cluster import RedisClusterProcesses, redis_cluster  # noqa: F401
from tests.store.test_tiers import CFG, assert_same, make_chunk

pytestmark = pytest.mark.redis

RETRY = 0.3  # the tier's fail-fast window after an error, short for the tests


def _tier(cluster: RedisClusterProcesses, prefix: str = "") -> RedisClusterTier:
    prefix = prefix or f"kvstash-cl-{uuid.uuid4().hex[:8]}:"
    return RedisClusterTier(CFG, cluster.url, prefix=prefix, retry_interval=RETRY)


def _fill(tier: RedisClusterTier, n: int) -> tuple[list[str], list]:
    chunks = [make_chunk(i) for i in range(n)]
    keys = [CFG.key(c.token_ids) for c in chunks]
    for key, chunk in zip(keys, chunks, strict=True):
        assert tier.put(key, chunk)
    return keys, chunks


def test_round_trip_over_several_nodes_and_shared_stats(redis_cluster: RedisClusterProcesses) -> None:  # noqa: F811
    store = open_store(f"{redis_cluster.url}?prefix=kvstash-cl-a:&ttl=60", CFG)
    (tier,) = store.tiers
    assert isinstance(tier, RedisClusterTier) and tier.ttl_seconds == 60
    keys, chunks = _fill(tier, 12)
    nodes = {redis_cluster.node_of("kvstash-cl-a:" + k).port for k in keys}
    assert len(nodes) == 3  # twelve keys land on every node
    assert_same(tier.get(keys[0], chunks[0].token_ids), chunks[0])
    got = tier.get_many([*keys, CFG.key([1, 2, 3])], [*(c.token_ids for c in chunks), [1, 2, 3]])
    for hit, chunk in zip(got, chunks, strict=False):
        assert_same(hit, chunk)
    assert got[-1] is None
    assert sorted(tier.keys()) == sorted(keys)  # the counters hash is not a record
    assert tier.verify() == (12, 12, 0)
    store.close()  # pushes the counts
    other = _tier(redis_cluster, "kvstash-cl-a:")  # another process opening the same cluster and prefix
    s = other.stats()
    size = len(tier.blob(keys[0]) or b"")
    assert (s.name, s.entries, s.bytes, s.tokens, s.counters) == ("redis-cluster", 12, 12 * size, 12 * 5, "shared")
    assert s.bytes_per_token == size / 5 and list(s.codecs) == ["fp32"]
    assert (s.puts, s.hits, s.misses, s.errors) == (12, 13, 1, 0)
    other.clear()
    assert list(other.keys()) == [] and other.stats().entries == 0
    other.close()


def test_a_killed_node_costs_its_keys_only_and_comes_back(
    redis_cluster: RedisClusterProcesses,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    tier = _tier(redis_cluster)
    keys, chunks = _fill(tier, 12)
    ids = [c.token_ids for c in chunks]
    dead = redis_cluster.node_of(tier.prefix + keys[0])
    on_dead = [redis_cluster.node_of(tier.prefix + k) is dead for k in keys]
    assert 0 < sum(on_dead) < len(keys)
    dead.stop()
    with caplog.at_level(logging.WARNING, logger="kvstash.store.base"):
        start = time.monotonic()
        got = tier.get_many(keys, ids)
        assert [g is None for g in got] == on_dead  # the others still hit
        for key, chunk, gone in zip(keys, chunks, on_dead, strict=True):
            hit = tier.get(key, chunk.token_ids)
            assert (hit is None) == gone and (gone or hit.chunk.token_ids == chunk.token_ids)
        assert not tier.put(keys[0], chunks[0])
        s = tier.stats()
        assert time.monotonic() - start < 5
    lost = sum(on_dead)
    assert s.entries == len(keys) - lost  # the dead node's records cannot be counted
    assert (s.misses, s.hits) == (2 * lost, 2 * (len(keys) - lost))
    assert s.errors == 1 + lost + 1 + 1  # the batch (one call for the node), its gets, the put, its scan
    failed = [r.message for r in caplog.records if "failed" in r.message]
    assert len(failed) == 1 and f"127.0.0.1:{dead.port}" in failed[0]  # one warning per node outage

    dead.start()  # same address, same slots (its nodes.conf), no data (no persistence)
    redis_cluster.wait_ok()
    time.sleep(RETRY + 0.1)
    assert tier.put(keys[0], chunks[0])  # no reconnecting by hand
    got = tier.get_many(keys, ids)
    assert [g is None for g in got] == [gone and i != 0 for i, gone in enumerate(on_dead)]
    tier.clear()
    tier.close()


def test_a_cluster_down_at_start_is_misses_then_serves(caplog: pytest.LogCaptureFixture) -> None:
    from tests.redis_cluster import skip_without_cluster_tools

    skip_without_cluster_tools()
    cluster = RedisClusterProcesses()
    try:
        tier = _tier(cluster)  # nothing listens yet: opening contacts nothing
        chunk = make_chunk(1)
        key = CFG.key(chunk.token_ids)
        assert not tier.put(key, chunk) and tier.get(key, chunk.token_ids) is None
        assert list(tier.keys()) == []
        assert tier.stats().errors >= 3
        cluster.start()
        time.sleep(RETRY + 0.1)
        assert tier.put(key, chunk)
        assert_same(tier.get(key, chunk.token_ids), chunk)
        tier.clear()
        tier.close()
    finally:
        cluster.cleanup()


DOCS = [
    "The Harbor Lantern Society was founded in 1887 in the port town of Velmora.",
    "Its members kept a lamp burning on the north pier every night for ninety years.",
    "The society's last president was Ada Quill, a ship's carpenter.",
    "She closed it in 1977 when an electric beacon replaced the lamp.",
    "Velmora's harbor master at the time was a man named Oren Pike.",
]
QUESTION = "Who was the last president of the Harbor Lantern Society?"


def test_engine_answer_through_the_cluster_equals_the_answer_without_a_store(
    engine,
    redis_cluster: RedisClusterProcesses,  # noqa: F811
) -> None:
    ask = dict(max_tokens=12, reuse="blend")
    alone = Engine(loaded=engine.lm, store="ram", codec="fp32").ask(QUESTION, DOCS, **ask)  # all computed
    spec = f"{redis_cluster.url}?prefix=kvstash-cl-eng-{uuid.uuid4().hex[:6]}:"
    eng = Engine(loaded=engine.lm, store=spec, codec="fp32")
    first = eng.ask(QUESTION, DOCS, **ask)
    assert first.text == alone.text and first.prefill.reused_tokens == 0
    (tier,) = eng.store.tiers
    spread = {redis_cluster.node_of(tier.prefix + k).port for k in tier.keys()}  # noqa: SIM118
    assert len(spread) >= 2
    redis_cluster.node_of(tier.prefix + next(iter(tier.keys()))).stop()  # mid-run
    part = eng.ask(QUESTION, DOCS, **ask)  # some chunks from the live nodes, the rest computed
    assert part.text == alone.text
    assert part.prefill.reused_tokens > 0
    assert tier.stats().errors > 0
    eng.close()


def test_document_registry_lives_in_the_cluster(redis_cluster: RedisClusterProcesses) -> None:  # noqa: F811
    from kvstash.server.documents import Document, RedisRegistry, open_registry

    registry = open_registry(f"ram,{redis_cluster.url}?prefix=kvstash-cl-docs:")
    shared = getattr(registry, "shared", registry)  # the Redis registry (maybe beside a local copy)
    assert isinstance(shared, RedisRegistry)
    doc = Document("doc-" + "0" * 24, ("one chunk", "two"), 5, 1700000000)
    registry.put(doc)
    assert shared.get(doc.id) == doc  # read back from the cluster itself
    assert registry.get(doc.id) == doc
    assert registry.delete(doc.id) and shared.get(doc.id) is None
    registry.close()
