"""The layer-by-layer engine equals transformers; prompts, sampling, stop strings and streaming behave."""

from __future__ import annotations

import pytest
import torch

from kvstash.engine import Engine
from kvstash.prompt import DEFAULT_SYSTEM, Segment
from kvstash.reuse.full import FullPrefill
from kvstash.sampling import SamplingParams

DOCS = [
    "Marie Curie discovered polonium and radium together with Pierre Curie.",
    "The Danube flows through Vienna, Bratislava, Budapest and Belgrade.",
]


def _ids(lm, text):
    return torch.tensor(lm.tokenizer(text)["input_ids"])


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


def test_document_tokens_do_not_depend_on_placement(engine):
    q = Segment("Who discovered radium?", "user")
    a = engine.plan([Segment(DOCS[0]), Segment(DOCS[1]), q])
    b = engine.plan([Segment(DOCS[1]), Segment("Another document in front."), Segment(DOCS[0]), q])
    docs_a = {s.token_ids for s in a.segments if s.kind == "document"}
    docs_b = {s.token_ids for s in b.segments if s.kind == "document"}
    assert docs_a <= docs_b
    # positions are contiguous and cover the whole prompt
    assert [s.start for s in b.segments] == [0, *[s.end for s in b.segments[:-1]]]


def test_plan_renders_the_chat_template(engine, lm):
    plan = engine.plan([Segment(DOCS[0]), Segment("Who discovered radium?", "user")])
    text = lm.tokenizer.decode(plan.token_ids)
    expected = lm.tokenizer.apply_chat_template(
        [
            {"role": "system", "content": DEFAULT_SYSTEM},
            {"role": "user", "content": DOCS[0] + "\n\nWho discovered radium?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == expected
    assert [s.kind for s in plan.segments] == ["glue", "system", "glue", "document", "user", "glue"]


def test_answers_capital_of_france(engine):
    r = engine.ask("What is the capital of France?", max_tokens=24)
    assert "paris" in r.text.lower()
    assert r.finish_reason == "stop"
    assert r.prompt_tokens > 0 and r.completion_tokens > 0 and r.ttft_s > 0


def test_rag_answer_uses_the_document(engine):
    r = engine.ask("Which two elements did Marie Curie discover?", DOCS, max_tokens=32)
    assert "radium" in r.text.lower() and "polonium" in r.text.lower()


def test_seeded_sampling_is_reproducible(engine):
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50)
    a = engine.ask("Write a word.", seed=7, **kw)
    b = engine.ask("Write a word.", seed=7, **kw)
    texts = {engine.ask("Write a word.", seed=s, **kw).text for s in range(1, 5)}
    assert a.token_ids == b.token_ids
    assert len(texts) > 1  # different seeds explore different answers


def test_stop_string_ends_generation_and_is_excluded(engine):
    q, sys = "Count from 1 to 10, one number per line.", "You are a helpful assistant."
    free = engine.ask(q, system=sys, max_tokens=40)
    assert "4" in free.text
    r = engine.ask(q, system=sys, max_tokens=40, stop=["4"])
    assert r.finish_reason == "stop"
    assert "4" not in r.text and r.text == free.text[: free.text.index("4")]


def test_max_tokens_gives_length_finish(engine):
    r = engine.ask("Tell me a long story about a dragon.", max_tokens=5)
    assert r.completion_tokens == 5 and r.finish_reason == "length"


def test_streaming_equals_non_streaming(engine):
    segs = [Segment(DOCS[1]), Segment("Name the cities on the Danube.", "user")]
    params = SamplingParams(max_tokens=30, stop=("Budapest",))
    gen = engine.stream(segs, params)
    deltas = list(gen)
    assert len(deltas) > 1
    assert "".join(deltas) == gen.result.text == engine.generate(segs, params).text


def test_prompt_over_context_limit_is_refused_before_compute(engine, monkeypatch):
    long_doc = "word " * (engine.lm.context_limit + 10)
    calls = []
    monkeypatch.setattr(engine.runner, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="at most 8192"):
        engine.ask("Summarize.", [long_doc])
    assert calls == []


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_bad_sampling_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_bad_segments(engine):
    with pytest.raises(TypeError):
        engine.generate(["not a segment"])
    with pytest.raises(TypeError):
        Segment(42)
    with pytest.raises(ValueError, match="user segment"):
        engine.generate([Segment("a document only")])
    with pytest.raises(ValueError, match="unknown reuse method"):
        engine.generate([Segment("hi", "user")], reuse="magic")


def test_engine_config_validation():
    with pytest.raises(ValueError, match="dtype"):
        Engine(dtype="int8")
