"""Prompt plans: documents tokenized alone, the chat template's glue, bad segments."""

from __future__ import annotations

import pytest

from kvstash.prompt import DEFAULT_SYSTEM, Segment

DOCS = [
    "Marie Curie discovered polonium and radium together with Pierre Curie.",
    "The Danube flows through Vienna, Bratislava, Budapest and Belgrade.",
]


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


def test_bad_segments(engine):
    with pytest.raises(TypeError):
        engine.generate(["not a segment"])
    with pytest.raises(TypeError):
        Segment(42)
    with pytest.raises(ValueError, match="user segment"):
        engine.generate([Segment("a document only")])
    with pytest.raises(ValueError, match="unknown reuse method"):
        engine.generate([Segment("hi", "user")], reuse="magic")
