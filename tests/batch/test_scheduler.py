"""Continuous batching: batched answers equal one-at-a-time answers, chunked prefill, the KV budget,
preemption, cancellation and clear refusals."""

from __future__ import annotations

import pytest

from kvstash.batch.scheduler import BatchConfig, Scheduler
from kvstash.compress.pipeline import Compression
from kvstash.engine import Engine, EngineConfig
from kvstash.prompt import Segment
from kvstash.reuse.full import FullPrefill
from kvstash.sampling import SamplingParams

DOCS = [
    "Marie Curie discovered polonium and radium together with Pierre Curie in Paris.",
    "The Danube flows through Vienna, Bratislava, Budapest and Belgrade into the Black Sea.",
    "The secret code of the blue project is 4417. Nobody else knows it.",
]
QUESTIONS = [
    "What is the secret code of the blue project?",
    "Which elements did Curie discover?",
    "Name the cities on the Danube.",
    "Write a short poem about rivers.",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def small(lm):
    """An engine over the shared weights whose prefill comes in chunks of 16 tokens: long prompts take several
    steps of the scheduler, interleaved with the others' decoding."""
    with Engine(EngineConfig(prefill_chunk=16, store="ram:256MiB"), loaded=lm) as engine:
        yield engine


def _prompts():
    docs = [[Segment(DOCS[i]) for i in order] for order in ((2, 0), (0,), (1, 0, 2), (), ())]
    return [[*d, Segment(q, "user")] for d, q in zip(docs, QUESTIONS, strict=True)]


def _params():
    return [
        SamplingParams(max_tokens=12),
        SamplingParams(max_tokens=20, stop=("radium",)),
        SamplingParams(max_tokens=24),
        SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=3),
        SamplingParams(max_tokens=5),
    ]


@pytest.mark.parametrize("reuse", ["full", "blend"])
def test_batched_answers_equal_one_at_a_time(small, reuse):
    """Greedy and seeded sampling alike: the same tokens, finish reasons and stop-string cuts."""
    prompts, params = _prompts(), _params()
    small.generate_many(prompts, params, reuse)  # warms the store for blend, so both runs see the same state
    alone = [small.generate(p, sp, reuse) for p, sp in zip(prompts, params, strict=True)]
    together = small.generate_many(prompts, params, reuse, batch=BatchConfig(max_batch=5, max_batch_tokens=40))
    for a, b in zip(alone, together, strict=True):
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert b.prefill.reused_tokens == a.prefill.reused_tokens
    assert together[1].finish_reason == "stop" and "radium" not in together[1].text
    assert together[4].finish_reason == "length" and together[4].completion_tokens == 5


def test_steps_mix_prefill_chunks_with_decoding(small):
    sched = Scheduler(small, BatchConfig(max_batch=4, max_batch_tokens=24))
    plans = [small.plan(p) for p in _prompts()[:3]]
    seqs = [sched.add(plan, SamplingParams(max_tokens=8), small.method("full")) for plan in plans]
    mixed = 0
    while sched.has_work:
        stats = sched.step()
        assert stats.prefill_work <= 24  # rows x the share of the layers they ran
        mixed += bool(stats.decoding and stats.prefill_tokens)
    assert mixed > 0  # prompts were prefilled while others decoded
    assert all(s.result is not None and s.result.completion_tokens > 0 for s in seqs)
    assert [s.result.token_ids for s in seqs] == [
        small.generate(p, SamplingParams(max_tokens=8)).token_ids for p in plans
    ]


LONG_ANSWERS = ("List the numbers from 1 to 100, separated by commas.", "Write a long story about a river.")


def _preempting(small, **config):
    """Two sequences that fit at first, in a budget one of them outgrows while decoding (90-token answers)."""
    prompts = [[Segment(q, "user")] for q in LONG_ANSWERS]
    sched = Scheduler(small, BatchConfig(max_batch=2, kv_budget=1, **config))  # replaced below, once sizes are known
    plans = [small.plan(p) for p in prompts]
    sched.kv_budget = sched.slot_bytes * (sum(len(p) + 64 for p in plans) + 30)  # one grows by 27, not both
    seqs = [sched.add(plan, SamplingParams(max_tokens=90), small.method("full")) for plan in plans]
    return prompts, sched, seqs


@pytest.fixture(scope="module")
def alone_long(small):
    """Each of the preempting tests' prompts answered alone (90 tokens): the reference, computed once."""
    return [small.generate([Segment(q, "user")], SamplingParams(max_tokens=90)) for q in LONG_ANSWERS]


@pytest.mark.parametrize("swap", [True, False])
def test_a_small_kv_budget_preempts_and_still_answers_the_same(small, alone_long, tmp_path, swap):
    """When decoding makes a cache grow past the budget, the newest is preempted: its KV swapped to a file and
    read back (or, with swap off, dropped and recomputed: prompt through its reuse method, answer so far in one
    pass). Either way the answers are the ones each gets alone, and no swap file is left behind."""
    _, sched, seqs = _preempting(small, swap=swap, swap_dir=str(tmp_path))
    alone = alone_long
    assert all(a.completion_tokens == 90 for a in alone)  # both caches must grow past prompt + 64 slots
    peak = 0
    while sched.has_work:
        sched.step()
        peak = max(peak, sched.kv_bytes())
    assert sched.preemptions >= 1 and seqs[1].preemptions >= 1
    assert peak <= sched.kv_budget
    assert [s.result.token_ids for s in seqs] == [a.token_ids for a in alone]
    if swap:
        assert sched.swap.written == sched.swap.read == sched.preemptions and sched.swap.failed == 0
    else:
        assert sched.swap is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "unwritable"])
def test_a_swap_that_fails_falls_back_to_recomputing(small, alone_long, tmp_path, damage):
    """A swap file cut short before it is read back, or a swap directory that cannot be written: the sequence
    is recomputed instead, counted, and still answers exactly as alone."""
    swap_dir = tmp_path / "swap"
    if damage == "unwritable":
        swap_dir.write_text("a file where the directory should be")
    _, sched, seqs = _preempting(small, swap_dir=str(swap_dir))
    alone = alone_long
    while sched.has_work:
        sched.step()
        for seq in seqs:
            if seq.swapped is not None and damage == "truncated":
                path = seq.swapped[0]
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert sched.preemptions >= 1 and sched.swap.failed >= 1 and sched.swap.read == 0
    assert [s.result.token_ids for s in seqs] == [a.token_ids for a in alone]
    if damage == "truncated":
        assert list(swap_dir.iterdir()) == []


def test_a_request_that_can_never_fit_is_refused_before_any_compute(small):
    sched = Scheduler(small, BatchConfig(kv_budget=100 * 2**20))
    plan = small.plan([Segment("Hello", "user")])
    with pytest.raises(ValueError, match="more than the whole KV budget.*--kv-budget"):
        sched.add(plan, SamplingParams(max_tokens=4000), small.method("full"))
    assert not sched.has_work


def test_a_cancelled_sequence_frees_its_place_and_the_others_finish(small):
    sched = Scheduler(small, BatchConfig(max_batch=2))
    done = []
    plans = [small.plan([Segment(q, "user")]) for q in QUESTIONS[:3]]
    seqs = [sched.add(p, SamplingParams(max_tokens=10), small.method("full"), on_done=done.append) for p in plans]
    sched.step()
    sched.cancel(seqs[0])
    sched.run_until_done()
    assert seqs[0].result is None and seqs[0].error is None and seqs[0].cancelled
    assert seqs[1].result is not None and seqs[2].result is not None
    assert sorted(s.id for s in done) == sorted(s.id for s in seqs)  # every one ended exactly once


def test_each_request_has_its_own_compression(small):
    sched = Scheduler(small, BatchConfig())
    plans = [small.plan([Segment(q, "user")]) for q in QUESTIONS[:2]]
    packed = sched.add(plans[0], SamplingParams(max_tokens=4), small.method("full"), Compression.parse(kv_bits=4))
    dense = sched.add(plans[1], SamplingParams(max_tokens=4), small.method("full"))
    sched.run_until_done()
    assert packed.result.kv_bytes < dense.result.kv_bytes  # its own (quantized) decode cache
    alone = small.generate(plans[0], SamplingParams(max_tokens=4), kv_bits=4)
    assert (alone.token_ids, alone.kv_bytes) == (packed.result.token_ids, packed.result.kv_bytes)
    assert dense.result.kv_bytes == small.generate(plans[1], SamplingParams(max_tokens=4)).kv_bytes


class Broken(FullPrefill):
    """A reuse method that fails after its first pass, as a store or model error would."""

    name = "broken"

    def prefill_steps(self, runner, plan, chunks=None):
        yield from super().prefill_steps(runner, plan, chunks)
        raise RuntimeError("the disk is on fire")


def test_a_failing_request_fails_alone(small):
    sched = Scheduler(small, BatchConfig())
    plans = [small.plan([Segment(q, "user")]) for q in QUESTIONS[:2]]
    bad = sched.add(plans[0], SamplingParams(max_tokens=4), Broken())
    good = sched.add(plans[1], SamplingParams(max_tokens=4), small.method("full"))
    sched.run_until_done()
    assert bad.result is None and isinstance(bad.error, RuntimeError) and "on fire" in str(bad.error)
    assert good.error is None and good.result.completion_tokens == 4
    with pytest.raises(RuntimeError, match="on fire"):
        small.generate_many([[Segment(QUESTIONS[0], "user")]], SamplingParams(max_tokens=4), Broken())


def test_batch_config_validation():
    for kw, match in [({"max_batch": 0}, "max_batch"), ({"max_batch_tokens": 0}, "max_batch_tokens"),
                      ({"kv_budget": 0}, "kv_budget")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            BatchConfig(**kw)


def test_a_blend_pass_over_the_budget_runs_a_few_layers_per_step_while_others_decode(small):
    """Chunked prefill by layers: a blended prompt whose pass is larger than the step's token budget runs a few
    layers per step, the chat already decoding gets a token in each of those steps, and both answers equal the
    ones computed alone."""
    blended, chat = _prompts()[2], [Segment("Write a poem about the sea.", "user")]
    params = SamplingParams(max_tokens=8)
    small.generate(blended, params, "blend")  # warm store
    alone = [small.generate(blended, params, "blend"), small.generate(chat, SamplingParams(max_tokens=40))]
    sched = Scheduler(small, BatchConfig(max_batch=2, max_batch_tokens=8))
    talk = sched.add(small.plan(chat), SamplingParams(max_tokens=40), small.method("full"))
    while talk.state.value != "decode":
        sched.step()
    seq = sched.add(small.plan(blended), params, small.method("blend"))
    layers_seen, decoded_meanwhile = set(), 0
    while sched.has_work:
        prefilling = seq.state.value in ("waiting", "prefill")
        stats = sched.step()
        if prefilling:
            assert stats.prefill_work <= 8
            layers_seen.add(seq.layer)
            decoded_meanwhile += stats.decoding
    assert len(layers_seen - {0}) >= 2  # passes stopped part-way, at two layers or more
    assert decoded_meanwhile >= 4  # the chat decoded while the blend prefilled
    assert seq.result.token_ids == alone[0].token_ids
    assert talk.result.token_ids == alone[1].token_ids
