"""The layer loop: equal to transformers, incremental and chunked passes, blocked attention, logit bias."""

from __future__ import annotations

import pytest
import torch

from kvstash.cache.kv import KVCache
from kvstash.model.runner import LayerHook, Rows, Runner
from kvstash.prompt import Segment
from kvstash.reuse.full import FullPrefill

DOCS = [
    "Marie Curie discovered polonium and radium together with Pierre Curie.",
    "The Danube flows through Vienna, Bratislava, Budapest and Belgrade.",
]


def _ids(lm, text):
    return torch.tensor(lm.tokenizer(text)["input_ids"])


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_forward_matches_transformers(engine, lm):
    ids = _ids(lm, "The capital of France is Paris. The capital of Germany is")
    with torch.inference_mode():
        ref = lm.model(ids[None]).logits[0].float()
    cache = engine.runner.new_cache(4)  # forces the cache to grow while writing
    ours = engine.runner.forward(ids, torch.arange(len(ids)), cache, all_logits=True)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4
    assert cache.length == len(ids)


def test_incremental_decoding_equals_one_forward(engine, lm):
    ids = _ids(lm, "One, two, three, four, five, six, seven")
    full = engine.runner.forward(ids, torch.arange(len(ids)), engine.runner.new_cache(), all_logits=True)
    cache = engine.runner.new_cache(2)
    engine.runner.forward(ids[:3], torch.arange(3), cache)
    steps = [engine.runner.forward(ids[i : i + 1], torch.tensor([i]), cache) for i in range(3, len(ids))]
    assert (torch.stack(steps) - full[3:]).abs().max().item() < 1e-4


def test_chunked_prefill_equals_single_pass(engine):
    plan = engine.plan([Segment(d) for d in DOCS] + [Segment("Who discovered radium?", "user")])
    one = FullPrefill(prefill_chunk=10_000).prefill(engine.runner, plan)
    chunked = FullPrefill(prefill_chunk=7).prefill(engine.runner, plan)
    assert (one.last_logits - chunked.last_logits).abs().max().item() < 1e-4
    assert torch.allclose(one.cache.keys, chunked.cache.keys, atol=1e-4)


def test_blocked_attention_reads_only_visible_keys_and_matches_one_call(engine):
    """The layer loop attends in blocks that leave out keys no query of the block can see: same output. Rows
    scattered over the cache (not one run of slots) go in blocks of ``scattered_block``."""
    torch.manual_seed(0)
    runner = Runner(engine.lm.model, block=64)
    assert runner.scattered_block == 16
    q, k, v = torch.randn(9, 40, 64), torch.randn(3, 100, 64), torch.randn(3, 100, 64)
    q_pos = torch.sort(torch.randperm(100)[:40]).values
    cache = KVCache(1, 3, 64, torch.float32, capacity=100)
    cache.extend(k[None], v[None], torch.arange(100))
    seen = []

    class Record(LayerHook):
        def attend(self, layer, q_, k_, v_, m_):
            seen.append(k_.shape[1])

    got = runner._attend_rows(0, Rows(q_pos, q_pos, cache, q_pos, hook=Record()), q)
    want = runner.attend(q, k, v, q_pos[:, None] >= torch.arange(100)[None])  # one call, [40, 100] causal
    assert torch.allclose(got, want, atol=1e-5)
    assert seen == [int(q_pos[min(s + 15, 39)]) + 1 for s in range(0, 40, 16)]  # each block: up to its last query


def test_a_huge_negative_logit_bias_is_the_same_as_evicting_the_key(engine):
    """Runner.forward adds the cache's bias to the attention logits: -1e9 on a slot = the slot removed."""
    ids = torch.tensor(engine.tokenizer.encode(DOCS[0]))
    n = len(ids)
    prompt = engine.runner.new_cache()
    engine.runner.forward(ids, torch.arange(n), prompt)
    drop = torch.tensor([3, 7])
    kept = torch.tensor([i for i in range(n) if i not in drop.tolist()])
    biased, evicted, unbiased = prompt.clone(), prompt.clone(), prompt.clone()
    biased.add_bias(0, drop, -1e9)
    evicted.keep(kept)
    unbiased.add_bias(0, drop, 0.0)  # a zero bias takes the float-mask path and changes nothing
    step = (torch.tensor([ids[0].item()]), torch.tensor([n]))
    ref = engine.runner.forward(*step, prompt.clone())
    assert _max_diff(engine.runner.forward(*step, biased), engine.runner.forward(*step, evicted)) < 1e-4
    assert _max_diff(engine.runner.forward(*step, unbiased), ref) < 1e-4
    assert _max_diff(engine.runner.forward(*step, biased), ref) > 1e-3


def _batch_cases(engine):
    """Five sequences of different kinds, each as (cache, next ids, their positions): decode tokens over a
    plain, a blended, a quantized and a per-head evicted cache, and a prefill chunk of a fresh prompt."""
    from kvstash.cache.quantized import quantize_cache
    from kvstash.compress.evict import SnapKV
    from kvstash.reuse.blend import BlendConfig, BlendReuse
    from kvstash.reuse.source import ChunkSource

    r = engine.runner
    plan = engine.plan([Segment(DOCS[0]), Segment(DOCS[1]), Segment("Who discovered radium?", "user")])
    plain = FullPrefill().prefill(r, plan).cache
    source = ChunkSource.open(r, engine.lm.fingerprint, "ram:64MiB", "fp32")
    BlendReuse(BlendConfig(ratio=0.2)).prefill(
        r, engine.plan([Segment(DOCS[1]), Segment(DOCS[0]), Segment("Hi?", "user")]), source
    )
    blended = BlendReuse(BlendConfig(ratio=0.2)).prefill(r, plan, source).cache
    assert blended.bias is not None  # the stale bias rides along
    quantized = quantize_cache(FullPrefill().prefill(r, plan).cache, 4)
    evicted = FullPrefill().prefill(r, plan).cache
    SnapKV(0.5, window=4).apply(r, evicted, plan.token_ids)
    assert not evicted.uniform  # per-head positions: the 3-D mask path
    n = len(plan)
    cases = [
        (c, torch.tensor([tok]), torch.tensor([n]))
        for c, tok in ((plain, 504), (blended, 198), (quantized, 42), (evicted, 7))
    ]
    fresh = _ids(engine.lm, DOCS[1] + " " + DOCS[0])
    cases.append((r.new_cache(8), fresh, torch.arange(len(fresh))))
    return cases


def test_a_batched_pass_equals_each_sequence_run_alone(engine):
    """One pass over decode tokens of plain, blended, quantized and evicted caches and a prefill chunk: every
    sequence's logits equal running it alone (fp32, 1e-4), and every cache ends the same."""
    r = engine.runner
    alone_cases = _batch_cases(engine)
    batch_cases = [(c.clone(), ids, pos) for c, ids, pos in alone_cases]
    alone = [r.logits(r.run([Rows(ids, pos, c)])[0]) for c, ids, pos in alone_cases]
    hs = r.run([Rows(ids, pos, c) for c, ids, pos in batch_cases])
    together = [r.logits(h) for h in hs]
    # the quantized cache (third) stores the new token's K/V in fp16: a 1e-7 change in a matmul can round an element
    # to the neighbouring fp16 value (2**-10 apart, relatively), so it is held to fp16's precision: such flips moved
    # the logits by up to 1.3e-3 on an AVX2 CPU (whose matmul kernels for 1 and for 5 rows round differently), while
    # a wrong key, position or mask moves them by whole units; the flips carry into later layers' new keys as
    # absolute errors of up to 2.5e-4 (measured there), hence its key atol
    logit_tol, key_rtol = [1e-4, 1e-4, 5e-3, 1e-4, 1e-4], [0, 0, 2**-10, 0, 0]
    key_atol = [1e-4, 1e-4, 1e-3, 1e-4, 1e-4]
    for i, ((a_cache, *_), (b_cache, *_)) in enumerate(zip(alone_cases, batch_cases, strict=True)):
        assert alone[i].shape == together[i].shape and _max_diff(alone[i], together[i]) < logit_tol[i]
        assert a_cache.length == b_cache.length
        assert torch.allclose(a_cache.keys, b_cache.keys, rtol=key_rtol[i], atol=key_atol[i])


@pytest.mark.parametrize("with_decoding", [False, True])
def test_a_pass_run_a_few_layers_at_a_time_equals_the_whole_pass(engine, with_decoding):
    """Rows run through layers [0, 4), [4, 11), [11, L) with their hidden states carried (a scheduler's
    chunked prefill by layers): the same hidden states and cache as one whole pass, bit for bit when alone;
    within fp32 rounding next to a decoding row that runs every layer in each of those runs (its rows join
    the matmuls)."""
    r = engine.runner
    plan = engine.plan([Segment(DOCS[0]), Segment("Who discovered radium?", "user")])
    ids, pos = torch.tensor(plan.token_ids), torch.arange(len(plan))
    whole_cache, split_cache = r.new_cache(), r.new_cache()
    (whole,) = r.run([Rows(ids, pos, whole_cache)])
    rows = Rows(ids, pos, split_cache)
    other = FullPrefill().prefill(r, engine.plan([Segment("Hello there.", "user")])).cache
    for first, last in ((0, 4), (4, 11), (11, None)):
        rows.first, rows.last = first, last
        if with_decoding:
            token = Rows(torch.tensor([42]), torch.tensor([other.length]), other)
            h, h_token = r.run([rows, token])
            assert h_token.shape == (1, whole.shape[1])  # the decoding row went through every layer
        else:
            (h,) = r.run([rows])
        assert h.shape == whole.shape
        rows.h = h
    if with_decoding:
        assert _max_diff(h, whole) <= 1e-5 * whole.abs().max().item()  # fp32 rounding (measured: 0 here)
        assert torch.allclose(split_cache.keys, whole_cache.keys, atol=1e-4)
    else:
        assert torch.equal(h, whole)
        assert torch.equal(split_cache.keys, whole_cache.keys) and torch.equal(split_cache.values, whole_cache.values)


def test_a_rows_cost_counts_its_attention_by_the_keys_it_reads(engine):
    """A scheduler's budget unit: a row reading no keys costs 1 through a layer; one at position p reads p + 1
    keys and costs 1 + (p + 1) / keys_per_row, where keys_per_row is the layer's linear flops over attention's
    flops per key (3072 for SmolLM2: 3.54M weights per layer / (2 * 9 heads * 64))."""
    r = engine.runner
    assert r.keys_per_row == 3072
    cache = r.new_cache()
    assert r.row_cost(Rows(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), cache)) == 3 + 6 / 3072
    assert r.row_cost(Rows(torch.tensor([1]), torch.tensor([5119]), cache)) == 1 + 5120 / 3072
    assert r.row_cost(Rows(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), cache)) == 0
    costs = r.position_costs(torch.tensor([10, 11, 12]))  # per row, as blend's budget="work" counts them
    assert torch.allclose(costs, torch.tensor([1.0 + 11 / 3072, 1.0 + 12 / 3072, 1.0 + 13 / 3072]))
    assert float(costs.sum()) == pytest.approx(
        r.row_cost(Rows(torch.tensor([1, 2, 3]), torch.tensor([10, 11, 12]), cache))
    )
