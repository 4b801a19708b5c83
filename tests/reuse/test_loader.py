"""Layer-wise loading: the same prefill as whole-chunk loading, and a damaged layer recomputed, never served."""

from __future__ import annotations

import pytest
import torch

from kvstash.prompt import Segment
from kvstash.reuse.blend import BlendConfig, BlendReuse
from kvstash.reuse.partial import NaiveReuse
from kvstash.reuse.source import ChunkSource
from kvstash.store.record import layer_range, parse_record_head

DOCS = [
    "Marie Curie discovered polonium and radium together with Pierre Curie in Paris.",
    "The Danube flows through Vienna, Bratislava, Budapest and Belgrade into the Black Sea.",
    "The secret code of the blue project is 4417. Nobody else knows it.",
]
QUESTION = Segment("What is the secret code of the blue project?", "user")


def _plan(engine, order):
    return engine.plan([Segment(DOCS[i]) for i in order] + [QUESTION])


@pytest.fixture()
def disk(engine, tmp_path):
    """Two views of one fp32 disk store: whole chunks, and layer by layer."""
    spec = f"disk:{tmp_path}:1GiB"
    whole = ChunkSource.open(engine.runner, engine.lm.fingerprint, spec, "fp32", layered=False)
    layered = ChunkSource.open(engine.runner, engine.lm.fingerprint, spec, "fp32")
    NaiveReuse().prefill(engine.runner, _plan(engine, (0, 1, 2)), whole)  # every chunk stored
    yield whole, layered
    whole.close()
    layered.close()


@pytest.mark.parametrize("method", [NaiveReuse(), BlendReuse(BlendConfig(ratio=0.3))], ids=["naive", "blend"])
def test_layered_loading_gives_the_same_prefill(engine, disk, method):
    whole, layered = disk
    assert layered.layered and not whole.layered  # a disk tier: layered by default
    plan = _plan(engine, (2, 0, 1))
    a = method.prefill(engine.runner, plan, whole)
    b = method.prefill(engine.runner, plan, layered)
    assert torch.equal(a.last_logits, b.last_logits)
    assert torch.equal(a.cache.keys, b.cache.keys) and torch.equal(a.cache.values, b.cache.values)
    docs = [s for s in b.report.segments if s.kind == "document"]
    assert [s.tier for s in docs] == ["disk"] * 3 and b.report.misses == 0
    want = [(s.reused, s.recomputed) for s in a.report.segments if s.kind == "document"]
    assert [(s.reused, s.recomputed) for s in docs] == want


def test_a_document_repeated_in_the_prompt_is_read_once_and_placed_twice(engine, disk):
    whole, layered = disk
    plan = _plan(engine, (2, 0, 2))
    a = NaiveReuse().prefill(engine.runner, plan, whole)
    b = NaiveReuse().prefill(engine.runner, plan, layered)
    assert torch.equal(a.last_logits, b.last_logits) and torch.equal(a.cache.keys, b.cache.keys)


def test_a_damaged_layer_is_recomputed_counted_and_healed(engine, disk):
    whole, layered = disk
    plan = _plan(engine, (1, 2, 0))
    want = BlendReuse(BlendConfig(ratio=0.3)).prefill(engine.runner, plan, whole)
    tier = layered.store.tiers[0]
    i = [j for j, s in enumerate(plan.segments) if s.kind == "document"][1]  # the secret-code document
    seg = plan.segments[i]
    path = tier._path(layered.store.key(seg.token_ids))
    blob = bytearray(path.read_bytes())
    offset, length = layer_range(parse_record_head(blob).header, 5)
    blob[offset + length // 2] ^= 0xFF  # one flipped byte inside layer 5's block
    path.write_bytes(bytes(blob))
    got = BlendReuse(BlendConfig(ratio=0.3)).prefill(engine.runner, plan, layered)
    assert torch.equal(got.last_logits, want.last_logits)  # the chunk computed again gives the same KV
    assert torch.equal(got.cache.keys, want.cache.keys) and torch.equal(got.cache.values, want.cache.values)
    assert got.report.misses == 1 and got.report.segments[i].tier is None
    assert got.report.segments[i].recomputed == len(seg.token_ids)
    assert tier.stats().corrupt == 1
    again = BlendReuse(BlendConfig(ratio=0.3)).prefill(engine.runner, plan, layered)  # stored again, intact
    assert again.report.misses == 0 and again.report.segments[i].tier == "disk"
    assert torch.equal(again.last_logits, want.last_logits)
