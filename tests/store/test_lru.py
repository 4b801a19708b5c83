"""LRU by bytes in the RAM and disk tiers, reopening, damage, two processes on one directory."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from pathlib import Path

import pytest
import torch

from kvstash.store import DiskTier, RamTier, StoreConfig
from kvstash.store.disk import SUFFIX
from tests.store.test_tiers import CFG, assert_same, blob_of, make_chunk

SIZE = len(blob_of(make_chunk(0)))  # every make_chunk record has this size


def _fill(tier, seeds):
    chunks = {s: make_chunk(s) for s in seeds}
    for chunk in chunks.values():
        assert tier.put(CFG.key(chunk.token_ids), chunk)
    return {s: CFG.key(c.token_ids) for s, c in chunks.items()}, chunks


N_KEYS = 4


def expected_chunk(key_index: int, writer: int):
    """Writer-specific content under a shared key: a torn or mixed record would match neither."""
    chunk = make_chunk(key_index)
    chunk.keys = chunk.keys + 1000 * writer
    chunk.values = chunk.values - 1000 * writer
    return chunk


def writer_reader(root: str, writer: int, rounds: int) -> tuple[int, int, int, int]:
    """Child process: write and read the shared keys; returns (hits, bad, corrupt, errors)."""
    tier = DiskTier(CFG, root, budget_bytes=3 * SIZE + SIZE // 2)  # evictions race with reads too
    candidates = [[expected_chunk(i, w) for w in (0, 1)] for i in range(N_KEYS)]
    hits = bad = 0
    for r in range(rounds):
        i = (r + writer) % N_KEYS
        mine = candidates[i][writer]
        tier.put(CFG.key(mine.token_ids), mine)
        j = (r * 3 + 1) % N_KEYS
        hit = tier.get(CFG.key(candidates[j][0].token_ids), candidates[j][0].token_ids)
        got = None if hit is None else hit.chunk
        if got is not None:
            hits += 1
            if not any(torch.equal(got.keys, c.keys) and torch.equal(got.values, c.values) for c in candidates[j]):
                bad += 1
    s = tier.stats()
    return hits, bad, s.corrupt, s.errors


@pytest.mark.parametrize("kind", ["ram", "disk"])
def test_lru_eviction_order(kind: str, tmp_path: Path) -> None:
    budget = 3 * SIZE + SIZE // 2  # room for three records
    tier = RamTier(CFG, budget) if kind == "ram" else DiskTier(CFG, tmp_path, budget)
    keys, chunks = _fill(tier, [0, 1, 2])
    assert tier.get(keys[0], chunks[0].token_ids) is not None  # 0 becomes most recent
    assert tier.contains(keys[1])  # contains does not refresh
    _, more = _fill(tier, [3])
    keys |= {3: CFG.key(more[3].token_ids)}
    assert tier.lru_keys() == [keys[2], keys[0], keys[3]]  # 1 was least recently used
    assert not tier.contains(keys[1])
    _fill(tier, [4])
    keys[4] = CFG.key(make_chunk(4).token_ids)
    assert tier.lru_keys() == [keys[0], keys[3], keys[4]]
    s = tier.stats()
    assert (s.entries, s.bytes, s.evictions) == (3, 3 * SIZE, 2)
    tier.check_integrity()
    if kind == "disk":
        assert sorted(p.name for p in tmp_path.glob("*" + SUFFIX)) == sorted(keys[i] + SUFFIX for i in (0, 3, 4))


@pytest.mark.parametrize("kind", ["ram", "disk"])
def test_record_larger_than_budget_is_rejected(kind: str, tmp_path: Path) -> None:
    tier = RamTier(CFG, SIZE - 1) if kind == "ram" else DiskTier(CFG, tmp_path, SIZE - 1)
    chunk = make_chunk(0)
    assert not tier.put(CFG.key(chunk.token_ids), chunk)
    s = tier.stats()
    assert (s.rejected, s.entries, s.puts, s.evictions) == (1, 0, 0, 0)


def test_ram_check_integrity_reports_numbers() -> None:
    tier = RamTier(CFG, 1 << 20)
    _fill(tier, [0])
    tier._bytes += 5
    with pytest.raises(RuntimeError, match=f"1 entries hold {SIZE} bytes, counted {SIZE + 5}"):
        tier.check_integrity()


def test_ram_tier_is_thread_safe() -> None:
    tier = RamTier(CFG, 4 * SIZE)
    chunks = [make_chunk(s) for s in range(8)]

    def work(offset: int) -> None:
        for i in range(200):
            c = chunks[(i + offset) % len(chunks)]
            tier.put(CFG.key(c.token_ids), c)
            got = tier.get(CFG.key(c.token_ids), c.token_ids)
            assert got is None or got.chunk.token_ids == c.token_ids

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tier.check_integrity()
    assert tier.stats().entries == 4 and tier.stats().corrupt == 0


def test_disk_survives_reopen_with_lru_order(tmp_path: Path) -> None:
    budget = 3 * SIZE + SIZE // 2
    tier = DiskTier(CFG, tmp_path, budget)
    keys, chunks = _fill(tier, [0, 1, 2])
    tier.get(keys[0], chunks[0].token_ids)
    order = tier.lru_keys()
    assert order == [keys[1], keys[2], keys[0]]

    reopened = DiskTier(CFG, tmp_path, budget)  # a new process would see the same
    assert reopened.lru_keys() == order
    assert (reopened.stats().entries, reopened.stats().bytes) == (3, 3 * SIZE)
    assert_same(reopened.get(keys[1], chunks[1].token_ids), chunks[1])  # 1 becomes most recent
    _fill(reopened, [3])
    assert not reopened.contains(keys[2]) and reopened.contains(keys[1])
    reopened.check_integrity()


def test_disk_damaged_files_are_counted_misses(tmp_path: Path) -> None:
    tier = DiskTier(CFG, tmp_path)
    keys, chunks = _fill(tier, [0, 1, 2, 3])
    path = {s: tmp_path / (k + SUFFIX) for s, k in keys.items()}
    os.truncate(path[0], SIZE // 3)  # truncated in place
    raw = bytearray(path[1].read_bytes())
    raw[SIZE // 2] ^= 0xFF  # one flipped byte
    path[1].write_bytes(raw)
    path[2].write_bytes(path[3].read_bytes())  # another key's record under this name
    for s in (0, 1, 2):
        assert tier.get(keys[s], chunks[s].token_ids) is None
        assert not path[s].exists()
    assert_same(tier.get(keys[3], chunks[3].token_ids), chunks[3])
    s = tier.stats()
    assert (s.corrupt, s.misses, s.hits, s.entries) == (3, 3, 1, 1)
    tier.check_integrity()


def test_disk_ignores_temp_and_foreign_files(tmp_path: Path) -> None:
    (tmp_path / ".abc.123.456.deadbeef.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "not a key.kv").write_text("hello")
    tier = DiskTier(CFG, tmp_path)
    assert list(tier.keys()) == [] and tier.stats().entries == 0
    (tmp_path / ("f" * 32 + SUFFIX)).write_bytes(os.urandom(300))  # garbage under a key-like name
    assert tier.verify().removed == 1 and tier.stats().corrupt == 1
    assert tier.gc() == 0  # the temp file is young: it may belong to a live writer
    old = 0
    os.utime(tmp_path / ".abc.123.456.deadbeef.tmp", (old, old))
    assert tier.gc() == 1
    counters = [".kvstash-counters.json", ".kvstash-counters.lock"]  # the shared counters stay
    assert sorted(p.name for p in tmp_path.iterdir()) == [*counters, "not a key.kv", "notes.txt"]


def test_disk_gc_applies_budget_to_files_from_other_processes(tmp_path: Path) -> None:
    other = DiskTier(CFG, tmp_path)
    keys, _ = _fill(other, [0, 1, 2])
    tier = DiskTier(CFG, tmp_path, 2 * SIZE)
    assert tier.gc() == 1
    assert tier.lru_keys() == [keys[1], keys[2]]
    assert tier.stats().evictions == 1


def test_disk_unwritable_root_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="writable directory"):
        DiskTier(CFG, blocker / "kv")


def test_two_processes_share_a_directory(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(writer_reader, [(str(tmp_path), 0, 150), (str(tmp_path), 1, 150)])
    for hits, bad, corrupt, errors in results:
        assert (bad, corrupt, errors) == (0, 0, 0)
        assert hits > 0
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    assert DiskTier(CFG, tmp_path).verify().removed == 0


def test_store_config_is_validated() -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        StoreConfig("")
    with pytest.raises(ValueError, match="positive"):
        RamTier(CFG, 0)
