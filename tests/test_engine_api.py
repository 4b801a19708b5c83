"""The engine: answers, sampling, stop strings, streaming, context limits, config checks."""

from __future__ import annotations

import pytest

from kvstash.engine import Engine
from kvstash.prompt import Segment
from kvstash.sampling import SamplingParams

DOCS = [
    "Marie Curie discovered polonium and radium together with Pierre Curie.",
    "The Danube flows through Vienna, Bratislava, Budapest and Belgrade.",
]


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


def test_ignore_eos_goes_on_to_max_tokens(engine):
    q = "What is the capital of France?"
    plain = engine.ask(q, max_tokens=24)
    assert plain.finish_reason == "stop" and plain.completion_tokens < 20
    r = engine.ask(q, max_tokens=20, ignore_eos=True)
    assert r.completion_tokens == 20 and r.finish_reason == "length"
    assert r.token_ids[: plain.completion_tokens] == plain.token_ids  # the same answer up to its end
    assert r.token_ids[plain.completion_tokens] in engine.eos_ids  # then the end-of-sequence token, kept
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos="yes")


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


def test_engine_config_validation():
    with pytest.raises(ValueError, match="dtype"):
        Engine(dtype="int8")
