"""Swap space: a cache written out and read back is the same cache; damaged files and odd caches are refused."""

from __future__ import annotations

import torch

from kvstash.batch.swap import SwapSpace
from kvstash.cache.layer import KVQuantConfig
from kvstash.cache.quantized import QuantizedKVCache


def _cache(runner, n=7):
    cache = runner.new_cache(n)
    shape = (cache.layers, cache.kv_heads, n, cache.head_dim)
    cache.extend(torch.randn(shape).to(cache.dtype), torch.randn(shape).to(cache.dtype), torch.arange(10, 10 + n))
    cache.add_bias(2, torch.tensor([1, 3]), -0.5)  # blend's stale bias on two keys, layers 2 and up
    return cache


def test_a_cache_reads_back_exactly_with_room_and_its_file_is_gone(engine, tmp_path):
    runner = engine.runner
    cache = _cache(runner)
    swap = SwapSpace(tmp_path)
    path = swap.save("seq-1", cache)
    assert path is not None and path.exists()
    back = swap.load(path, runner, room=5)
    assert not path.exists() and (swap.written, swap.read, swap.failed) == (1, 1, 0)
    assert back.length == 7 and back.capacity == 12
    assert torch.equal(back.keys, cache.keys) and torch.equal(back.values, cache.values)
    assert torch.equal(back.positions, cache.positions)
    assert torch.equal(back.layer_bias(3), cache.layer_bias(3)) and back.layer_bias(1).abs().sum() == 0
    assert back.layer_bias(3)[:, 1].eq(-0.5).all()


def test_damaged_or_foreign_files_are_refused_and_odd_caches_are_not_swapped(engine, tmp_path):
    runner = engine.runner
    swap = SwapSpace(tmp_path)
    path = swap.save("seq-1", _cache(runner))
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    assert swap.load(path, runner) is None and swap.failed == 1 and not path.exists()
    path = swap.save("seq-2", _cache(runner))
    path.write_bytes(b"not a swap file at all")
    assert swap.load(path, runner) is None and swap.failed == 2
    assert swap.load(tmp_path / "never-written.safetensors", runner) is None and swap.failed == 3
    evicted = _cache(runner)
    evicted.uniform = False
    assert not SwapSpace.can_swap(evicted) and SwapSpace.can_swap(_cache(runner))
    quantized = QuantizedKVCache(runner.num_layers, runner.kv_heads, runner.head_dim, runner.dtype, KVQuantConfig())
    assert not SwapSpace.can_swap(quantized)


def test_two_spaces_sharing_a_directory_keep_their_own_files(engine, tmp_path):
    """Two servers pointed at one --swap-dir: the same sequence name gives two files, each read back as its own."""
    runner = engine.runner
    a, b = SwapSpace(tmp_path), SwapSpace(tmp_path)
    first, second = _cache(runner, n=5), _cache(runner, n=9)
    pa, pb = a.save("seq-1", first), b.save("seq-1", second)
    assert pa != pb and len(list(tmp_path.iterdir())) == 2
    assert a.load(pa, runner).length == 5 and b.load(pb, runner).length == 9
    assert list(tmp_path.iterdir()) == []
