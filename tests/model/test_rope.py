"""Rotary embedding: re-positioned keys equal keys computed there; unsupported rope types refused."""

from __future__ import annotations

import types

import pytest
import torch

from kvstash.model.rope import Rope, reposition


def test_reposition_matches_keys_computed_at_the_offset(engine, lm):
    ids = torch.tensor(lm.tokenizer("Paris is the capital of France.")["input_ids"])
    r = engine.runner
    at0, atp = r.new_cache(), r.new_cache()
    p = 300
    r.forward(ids, torch.arange(len(ids)), at0)
    r.forward(ids, torch.arange(p, p + len(ids)), atp)
    moved = reposition(at0.keys[0], at0.positions, atp.positions, r.rope)  # layer 0
    assert (moved - atp.keys[0]).abs().max().item() < 1e-4
    assert torch.equal(at0.values[0], atp.values[0])  # values carry no position


def test_unsupported_rope_is_refused():
    fake = types.SimpleNamespace(model=types.SimpleNamespace(rotary_emb=types.SimpleNamespace(rope_type="dynamic")))
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported"):
        Rope.from_model(fake)


def test_reposition_into_a_strided_view_equals_the_per_token_rotation(engine):
    """A whole-chunk shift (one angle per frequency) written into a slice of a cache is bitwise the same as
    rotating every token by its own shift; a shift that differs per token still works."""
    torch.manual_seed(0)
    rope = engine.runner.rope
    keys = torch.randn(4, 3, 20, 64).half()  # [L, KVH, T, D] as a fp16 store hands them out
    old, new = torch.arange(20), torch.arange(500, 520)
    cos, sin = rope.cos_sin(new - old, scaled=False)  # [T, D]: the per-token reference
    want = (keys.float() * cos + torch.cat((-keys.float()[..., 32:], keys.float()[..., :32]), -1) * sin).bfloat16()
    cache = torch.zeros(4, 3, 100, 64, dtype=torch.bfloat16)
    out = reposition(keys, old, new, rope, out=cache[:, :, 40:60])
    assert out.data_ptr() == cache[:, :, 40:60].data_ptr() and torch.equal(cache[:, :, 40:60], want)
    assert not cache[:, :, :40].any() and not cache[:, :, 60:].any()  # nothing outside the slice written
    uneven = torch.tensor([3] * 10 + [7] * 10) + old  # per-token shifts (no single angle)
    got = reposition(keys.float(), old, uneven, rope)
    c2, s2 = rope.cos_sin(uneven - old, scaled=False)
    ref = keys.float() * c2 + torch.cat((-keys.float()[..., 32:], keys.float()[..., :32]), -1) * s2
    assert torch.equal(got, ref)
    assert torch.equal(reposition(keys, old, old, rope, dtype=torch.float32), keys.float())  # no move: a cast
