"""KVCache: growth, per-head keep, and the logit bias following its slots."""

from __future__ import annotations

import torch

from kvstash.cache.kv import KVCache


def test_cache_grows_and_keeps_contents():
    c = KVCache(layers=2, kv_heads=1, head_dim=2, dtype=torch.float32, capacity=1)
    for i in range(5):
        s = c.append(torch.tensor([i]))
        for layer in range(2):
            c.write(layer, s, torch.full((1, 1, 2), float(i + 10 * layer)), torch.zeros(1, 1, 2))
    assert c.length == 5 and c.capacity >= 5
    assert c.keys[1, 0, :, 0].tolist() == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert c.positions.tolist() == [0, 1, 2, 3, 4]


def test_keep_per_head_marks_cache_non_uniform():
    c = KVCache(layers=1, kv_heads=2, head_dim=1, dtype=torch.float32)
    c.extend(
        torch.arange(8.0).view(1, 1, 4, 2).permute(0, 3, 2, 1).contiguous(),
        torch.zeros(1, 2, 4, 1),
        torch.arange(4),
    )
    c.keep(torch.tensor([[[0, 3], [1, 2]]]))
    assert c.length == 2 and not c.uniform
    assert c.pos[0, :, :2].tolist() == [[0, 3], [1, 2]]


def test_logit_bias_follows_its_slots_through_grow_keep_and_clone():
    c = KVCache(layers=2, kv_heads=2, head_dim=1, dtype=torch.float32, capacity=2)
    c.extend(torch.zeros(2, 2, 3, 1), torch.zeros(2, 2, 3, 1), torch.arange(3))
    assert c.layer_bias(0) is None  # no bias until one is added
    c.add_bias(1, torch.tensor([0, 2]), -0.5)
    assert c.layer_bias(0).tolist() == [[0.0, 0.0, 0.0]] * 2  # layers before first_layer untouched
    assert c.layer_bias(1).tolist() == [[-0.5, 0.0, -0.5]] * 2
    c.append(torch.tensor([3, 4, 5]))  # grows past capacity: new slots start unbiased
    assert c.layer_bias(1).tolist() == [[-0.5, 0.0, -0.5, 0.0, 0.0, 0.0]] * 2
    copy = c.clone()
    c.keep(torch.tensor([[[2, 3], [0, 1]]] * 2))  # per head: each head keeps its own slots' bias
    assert c.layer_bias(1).tolist() == [[-0.5, 0.0], [-0.5, 0.0]] and c.layer_bias(0).tolist() == [[0.0, 0.0]] * 2
    assert copy.layer_bias(1)[0].tolist() == [-0.5, 0.0, -0.5, 0.0, 0.0, 0.0]
    copy.append(torch.tensor([6]))
    assert copy.layer_bias(1)[0, -1].item() == 0.0
