"""Speculative decoding: n-gram drafts as trees, tree verification equal to one-token steps, the accepted rows
kept, greedy answers identical to plain decoding (plain, blended, quantized, evicted caches, batched), and
speculative sampling that keeps the model's distribution."""

from __future__ import annotations

import pytest
import torch

from kvstash.batch.scheduler import BatchConfig
from kvstash.cache.kv import KVCache
from kvstash.engine import Engine, EngineConfig
from kvstash.model.runner import Rows
from kvstash.prompt import Segment
from kvstash.sampling import SamplingParams, probabilities, sample_with_drafts
from kvstash.speculate.drafter import NgramDrafter
from kvstash.speculate.speculation import SpecConfig
from kvstash.speculate.tree import DraftTree

DOC = (
    "The Zorblat Institute was founded in 1987 by Mirela Vantosk in the city of Quillmere. Its first "
    "director, Anselm Trebbick, built the observatory on Harrow Hill. The secret code of the blue project "
    "is 441790. The institute studies the migration of the silver moth across the northern plains."
)
QUESTIONS = [
    "Who founded the Zorblat Institute, and when? Quote the document.",
    "What is the secret code of the blue project? Reply with the six-digit number.",
    "Repeat the first sentence of the document word for word.",
]


# --- drafts and trees: exact outcomes on constructed sequences ----------------------------------------------
def test_ngram_drafter_longest_match_first_then_branches():
    d = NgramDrafter(max_n=3, min_n=1, branches=4)
    d.extend([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3])  # the sequence ends in "2 3"
    # "2 3" (and "7 2 3"? no earlier match) was followed by "5 6 7" (most recent) and "4 9 2"
    assert d.continuations(3) == [[5, 6, 7], [4, 9, 2]]
    tree = d.propose(depth=3, nodes=16)
    assert tree.tokens == [5, 6, 7, 4, 9, 2] and tree.parents == [-1, 0, 1, -1, 3, 4]
    assert tree.depths() == [1, 2, 3, 1, 2, 3]
    assert d.propose(depth=3, nodes=4).tokens == [5, 6, 7, 4]  # the node budget cuts the second branch
    d.extend([42])
    assert d.continuations(3) == []  # "3 42" / "42" never occurred before: nothing to propose


def test_shared_prefixes_become_one_branch():
    d = NgramDrafter(max_n=2, min_n=2)
    d.extend([8, 1, 2, 3, 8, 1, 2, 4, 8, 1])
    tree = d.propose(depth=3, nodes=16)
    assert tree.tokens == [2, 4, 8, 3, 8] and tree.parents == [-1, 0, 1, 0, 3]  # "2" shared by both


def test_tree_visibility_is_ancestors_and_self():
    tree = DraftTree()
    a = tree.add(10, -1)
    b = tree.add(11, a)
    c = tree.add(12, -1)
    vis = tree.visibility()  # rows: 0 pending, 1 a, 2 b, 3 c
    assert vis.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, False, False, True],
    ]
    assert tree.children(-1) == {10: a, 12: c} and tree.children(a) == {11: b}


def test_keep_tail_drops_rejected_rows_and_moves_only_when_needed():
    cache = KVCache(1, 1, 2, torch.float32, capacity=8)
    cache.extend(torch.arange(12.0).view(1, 1, 6, 2), -torch.arange(12.0).view(1, 1, 6, 2), torch.arange(6))
    cache.keep_tail(2, [2, 4, 5])
    assert cache.length == 5 and cache.positions.tolist() == [0, 1, 2, 4, 5]
    assert cache.keys[0, 0, :, 0].tolist() == [0, 2, 4, 8, 10]
    cache.keep_tail(3, [3])  # already in place: a truncation
    assert cache.length == 4 and cache.positions.tolist() == [0, 1, 2, 4]


# --- verification ------------------------------------------------------------------------------------------
def test_a_tree_pass_gives_each_node_the_logits_of_its_own_path(engine):
    """Two branches verified in one pass: every node's logits equal a plain pass over the prompt and its path."""
    r = engine.runner
    prompt = torch.tensor(engine.tokenizer("The capital of France is Paris and the")["input_ids"])
    n = len(prompt)
    base = r.new_cache()
    r.forward(prompt, torch.arange(n), base)
    tree = DraftTree()
    x = tree.add(3681, -1)
    tree.add(314, x)
    tree.add(1357, -1)
    pending = 260
    ids = torch.tensor([pending, *tree.tokens])
    pos = torch.tensor([n, *(n + d for d in tree.depths())])
    cache = base.clone()
    (h,) = r.run([Rows(ids, pos, cache, tree=tree.visibility())])
    got = r.logits(h)
    for row, path in enumerate([[pending], [pending, 3681], [pending, 3681, 314], [pending, 1357]]):
        alone = base.clone()
        want = r.forward(torch.tensor(path), torch.arange(n, n + len(path)), alone)
        assert (got[row] - want).abs().max() < 1e-4, row


@pytest.fixture(scope="module")
def spec_engine(lm):
    with Engine(EngineConfig(store="ram:256MiB"), loaded=lm) as engine:
        yield engine


def _prompts():
    return [[Segment(DOC), Segment(q, "user")] for q in QUESTIONS]


@pytest.mark.parametrize(
    "options",
    [{}, {"reuse": "blend"}, {"kv_bits": 4}, {"evict": "snapkv:0.5"}, {"reuse": "blend", "kv_bits": 8}],
    ids=["plain", "blended", "quantized", "evicted", "blended+quantized"],
)
def test_greedy_answers_are_identical_to_plain_decoding(spec_engine, options):
    params = SamplingParams(max_tokens=40)
    gained = 0
    for prompt in _prompts():
        plain = spec_engine.generate(prompt, params, speculate="off", **options)
        spec = spec_engine.generate(prompt, params, speculate="ngram", **options)
        assert spec.token_ids == plain.token_ids and spec.finish_reason == plain.finish_reason
        assert plain.speculation is None and spec.speculation["forwards"] <= len(spec.token_ids)
        gained += spec.speculation["accepted"]
    assert gained > 0  # answers that quote the document were drafted from it and accepted


def test_batched_speculation_answers_like_plain_one_at_a_time(spec_engine):
    params = SamplingParams(max_tokens=32)
    prompts = [*_prompts(), [Segment("Write a short poem about rivers.", "user")]]
    alone = [spec_engine.generate(p, params, speculate="off") for p in prompts]
    together = spec_engine.generate_many(prompts, params, speculate="ngram", batch=BatchConfig(max_batch=4))
    assert [r.token_ids for r in together] == [a.token_ids for a in alone]
    assert sum(r.speculation["accepted"] for r in together) > 0


def test_drafting_pauses_while_the_batch_is_crowded(spec_engine):
    """Over ``max_batch`` sequences decoding at once nothing is drafted; fewer, and drafting resumes."""
    params = SamplingParams(max_tokens=32)
    prompts = _prompts()[:3]
    alone = [spec_engine.generate(p, params, speculate="off") for p in prompts]
    runs = {
        cap: spec_engine.generate_many(prompts, params, speculate=SpecConfig(max_batch=cap), batch=BatchConfig())
        for cap in (1, 2, len(prompts))
    }
    for results in runs.values():
        assert [r.token_ids for r in results] == [a.token_ids for a in alone]
    drafted = {cap: sum(r.speculation["drafted"] for r in results) for cap, results in runs.items()}
    assert drafted[1] <= drafted[2] <= drafted[len(prompts)] and drafted[1] < drafted[len(prompts)], drafted


def test_speculation_stays_off_where_the_cache_evicts_while_decoding(spec_engine):
    res = spec_engine.generate(
        _prompts()[2], SamplingParams(max_tokens=12), evict="streaming:64:decode", speculate="ngram"
    )
    assert res.speculation is None


def test_speculation_config_and_parsing():
    assert SpecConfig.parse("off") is None and SpecConfig.parse(None) is None
    assert SpecConfig.parse("ngram").method == "ngram"
    for bad, match in [
        ({"method": "eagle"}, "off, ngram"),
        ({"depth": 0}, "depth"),
        ({"min_n": 3, "max_n": 2}, "min_n"),
        ({"max_batch": 0}, "max_batch"),
    ]:
        with pytest.raises(ValueError, match=match):
            SpecConfig(**bad)
    with pytest.raises(ValueError, match="off, ngram"):
        EngineConfig(speculate="eagle")


# --- sampling ------------------------------------------------------------------------------------------------
def test_speculative_sampling_keeps_the_models_distribution():
    """Deterministic drafts accepted by the residual rule: the token's distribution is p, whatever the drafts."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1)
    p = probabilities(logits, params)
    gen = torch.Generator().manual_seed(0)
    n = 40000
    for drafts in ([1], [3, 0], [5, 4, 2]):
        counts = torch.zeros(6)
        for _ in range(n):
            counts[sample_with_drafts(logits, params, gen, drafts)] += 1
        freq = counts / n
        assert (freq - p).abs().max() < 0.01, (drafts, freq, p)  # ~4.5 standard errors at the largest p
        assert freq[p == 0].sum() == 0  # top-p cut tokens never appear, drafted or not
    greedy = SamplingParams()
    assert sample_with_drafts(logits, greedy, gen, [3]) == 0  # greedy: the argmax, draft or not


def test_sampled_answers_with_speculation_stay_reproducible(spec_engine):
    params = SamplingParams(max_tokens=24, temperature=0.7, seed=5)
    a = spec_engine.generate(_prompts()[0], params, speculate="ngram")
    b = spec_engine.generate(_prompts()[0], params, speculate="ngram")
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0
