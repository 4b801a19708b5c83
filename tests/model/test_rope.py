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
