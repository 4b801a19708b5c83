"""Benchmark datasets: loading, needles, options and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvstash.bench import (
    Example,
    answers_agree,
    contains_gold,
    data_file,
    exact_match,
    f1_score,
    kl_divergence,
    load_dataset,
    logit_margins,
    normalize_answer,
    summarize,
)
from kvstash.bench.datasets import DATA_ENV, FILES, NEEDLE_ASK


@pytest.fixture(scope="module")
def data_dir():
    try:
        return data_file(FILES["musique"]).parent
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _gold_doc_count(ex: Example) -> int:
    return sum(contains_gold(d, ex.answers) for d in ex.documents)


def test_normalize_answer_drops_case_punctuation_articles_spaces():
    assert normalize_answer("  The Eiffel-Tower, in   PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_f1_score():
    assert f1_score("the Eiffel Tower", ["Eiffel tower in Paris"]) == pytest.approx(2 / 3)
    assert f1_score("Paris", ["London", "paris."]) == 1.0  # max over golds
    assert f1_score("blue red", "red green") == pytest.approx(0.5)
    assert f1_score("red red", ["red"]) == pytest.approx(2 / 3)  # repeated tokens count once per match
    assert f1_score("the", ["a"]) == 1.0  # both normalize to nothing
    assert f1_score("nothing alike", ["other"]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        f1_score("x", [])


def test_exact_match_and_contains_gold():
    assert exact_match("The Beatles.", ["beatles"])
    assert not exact_match("The Beatles band", ["beatles"])
    assert contains_gold("I think it was the Beatles, in 1962.", ["Beatles"])
    assert contains_gold("answer: 1962", ["Elvis", "1962"])
    assert not contains_gold("it was 10", ["1"])  # whole tokens only
    assert not contains_gold("anything", ["the"])  # an empty normalized gold never matches


def test_answers_agree():
    assert answers_agree("The Eiffel Tower.", "eiffel tower")
    assert not answers_agree("Eiffel Tower", "Eiffel Tower in Paris")


def test_kl_divergence():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    assert torch.equal(kl_divergence(logits, logits), torch.zeros(2, dtype=torch.float64))
    # 2 classes: p = (1/2, 1/2) from equal logits, q = (1/(1+e), e/(1+e)) from logits (0, 1)
    p, q = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    q0, q1 = 1 / (1 + math.e), math.e / (1 + math.e)
    expected = 0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / q1)
    out = kl_divergence(p, q)
    assert out.shape == (1,) and out.dtype == torch.float64
    assert out.item() == pytest.approx(expected, abs=1e-12)
    assert kl_divergence(p[0], q[0]).item() == pytest.approx(expected, abs=1e-12)  # [V] -> scalar
    assert kl_divergence(logits + 7.0, logits).abs().max().item() < 1e-12  # shift-invariant
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(p, torch.zeros(1, 3))


def test_logit_margins():
    logits = torch.tensor([[1.0, 3.0, 2.5], [4.0, 0.0, 4.0], [0.0, -1.0, 2.0]])
    out = logit_margins(logits, [1, 0, 1])
    assert out.tolist() == [0.5, 0.0, -3.0]  # clear, a tie, greedy would leave the answer
    assert logits[0, 1] == 3.0  # the input is not written
    with torch.inference_mode():  # as the engine returns them
        assert logit_margins(logits.clone(), [1, 0, 1]).tolist() == [0.5, 0.0, -3.0]
    with pytest.raises(ValueError, match="one logits row per answer token"):
        logit_margins(logits, [1, 0])


def test_summarize():
    assert summarize([3.0, 1.0, 2.0, 4.0]) == {"median": 2.5, "p90": pytest.approx(3.7), "mean": 2.5}
    assert summarize([5]) == {"median": 5.0, "p90": 5.0, "mean": 5.0}
    values = list(range(11))  # p90 lands exactly on the 10th element
    assert summarize(values)["p90"] == 9.0
    with pytest.raises(ValueError, match="empty"):
        summarize([])


@pytest.mark.parametrize("name", ["musique", "wikimqa"])
def test_normalized_sets(data_dir, name):
    exs = load_dataset(name, n=4, passages=3, data_dir=data_dir)
    assert len(exs) == 4 and all(len(e.documents) == 3 for e in exs)
    assert len({e.id for e in exs}) == 4
    assert all(e.question and e.answers for e in exs)
    assert len(load_dataset(name, data_dir=data_dir)) == {"musique": 150, "wikimqa": 102}[name]
    with pytest.raises(ValueError, match="between 1 and 10"):
        load_dataset(name, n=1, passages=11, data_dir=data_dir)


@pytest.mark.parametrize("name", ["nq", "squad"])
@pytest.mark.parametrize(("position", "index"), [(0, 0), (3, 3), (-1, 4), ("first", 0), ("middle", 2), ("last", 4)])
def test_gold_position(data_dir, name, position, index):
    exs = load_dataset(name, n=6, passages=5, seed=3, data_dir=data_dir, gold_position=position)
    assert len(exs) == 6
    for e in exs:
        assert len(e.documents) == 5 and len(set(e.documents)) == 5
        assert e.meta["gold_index"] == index
        assert contains_gold(e.documents[index], e.answers)
        assert _gold_doc_count(e) == 1  # distractors never contain a gold answer


def test_nq_gold_is_the_rows_passage(data_dir):
    e = load_dataset("nq", n=1, passages=4, gold_position=1, data_dir=data_dir)[0]
    assert e.id == "nq_open_oracle_0"
    assert e.question == "who got the first nobel prize in physics"
    assert e.documents[1].startswith("List of Nobel laureates in Physics\nThe first Nobel Prize")


@pytest.mark.parametrize("name", ["nq", "squad", "kv", "needle", "needle-code"])
def test_deterministic_per_seed_and_prefix_stable(data_dir, name):
    a = load_dataset(name, n=4, passages=4, seed=7, data_dir=data_dir)
    b = load_dataset(name, n=4, passages=4, seed=7, data_dir=data_dir)
    c = load_dataset(name, n=4, passages=4, seed=8, data_dir=data_dir)
    assert a == b
    if name != "kv":  # kv keeps the file's order unless gold_position asks otherwise
        assert [e.documents for e in a] != [e.documents for e in c]
    assert load_dataset(name, n=2, passages=4, seed=7, data_dir=data_dir) == a[:2]


def test_random_gold_position_varies(data_dir):
    exs = load_dataset("nq", n=30, passages=5, seed=0, data_dir=data_dir)
    assert len({e.meta["gold_index"] for e in exs}) > 1


def test_kv(data_dir):
    exs = load_dataset("kv", n=3, passages=4, data_dir=data_dir)
    assert len(exs) == 3
    for e in exs:
        key = e.meta["key"]
        docs = [json.loads(d) for d in e.documents]
        assert [len(d) for d in docs] == [19, 19, 19, 18]
        assert docs[e.meta["gold_index"]][key] == e.answers[0]
        assert sum(key in d for d in docs) == 1
        assert key in e.question
    moved = load_dataset("kv", n=3, passages=4, gold_position="last", data_dir=data_dir)
    for e in moved:
        assert e.meta["gold_index"] == 3 and e.meta["key"] in e.documents[3]


@pytest.mark.parametrize(("depth", "index"), [(0.0, 0), (0.5, 2), (0.99, 4), (1.0, 4)])
def test_needle_depth(data_dir, depth, index):
    exs = load_dataset("needle", n=5, passages=5, seed=1, depth=depth, data_dir=data_dir)
    assert len({e.id for e in exs}) == 5
    for e in exs:
        needle = e.meta["needle"]
        assert e.answers[0] in needle and len(e.answers[0]) == 6 and e.answers[0].isdigit()
        assert [needle in d for d in e.documents].count(True) == 1
        assert e.meta["gold_index"] == index and needle in e.documents[index]
        doc = e.documents[index]
        offset = doc.index(needle)
        assert offset == e.meta["offset"]
        assert offset == 0 or doc[offset - 2 : offset] == ". " or offset + len(needle) == len(doc)
        if depth == 0.0:
            assert offset == 0
        if depth == 1.0:
            assert doc.endswith(needle)
        assert "secret code" in e.question and e.answers[0] not in e.question


def test_needle_random_depth_spreads(data_dir):
    exs = load_dataset("needle", n=20, passages=10, seed=2, data_dir=data_dir)
    assert len({e.meta["gold_index"] for e in exs}) > 3
    assert all(0.0 <= e.meta["depth"] <= 1.0 for e in exs)


def test_bad_arguments(data_dir):
    with pytest.raises(ValueError, match="musique, wikimqa, nq, squad, kv, needle"):
        load_dataset("trivia", n=1)
    with pytest.raises(ValueError, match="allowed: gold_position"):
        load_dataset("nq", n=1, data_dir=data_dir, depth=0.5)
    with pytest.raises(ValueError, match="gold_position"):
        load_dataset("nq", n=1, passages=3, gold_position=3, data_dir=data_dir)
    with pytest.raises(ValueError, match="'middle'|middle"):
        load_dataset("squad", n=1, gold_position="centre", data_dir=data_dir)
    with pytest.raises(ValueError, match="depth"):
        load_dataset("needle", n=1, depth=1.5, data_dir=data_dir)
    with pytest.raises(ValueError, match="150 examples"):
        load_dataset("musique", n=151, data_dir=data_dir)


def test_missing_file_names_path_and_option(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("nq", n=1, data_dir=tmp_path)
    msg = str(err.value)
    assert str((tmp_path / "nq_open_oracle.json").resolve()) in msg
    assert "--data-dir" in msg and DATA_ENV in msg
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        load_dataset("squad", n=1)


def test_needle_code_is_needle_with_the_instruction(data_dir):
    bare = load_dataset("needle", n=4, passages=4, seed=3, data_dir=data_dir)
    code = load_dataset("needle-code", n=4, passages=4, seed=3, data_dir=data_dir)
    for b, c in zip(bare, code, strict=True):
        assert c.documents == b.documents and c.answers == b.answers and c.meta == b.meta
        assert c.question == f"{b.question} {NEEDLE_ASK}" and c.id == b.id.replace("needle", "needle-code")
    deep = load_dataset("needle-code", n=2, passages=4, seed=3, depth=1.0, data_dir=data_dir)
    assert all(e.meta["gold_index"] == 3 for e in deep)


@pytest.mark.parametrize("haystack", ["wikimqa", "squad"])
def test_needle_in_another_haystack(data_dir, haystack):
    """Same codes and nouns as the musique needles of the seed, hidden in another dataset's passages."""
    base = load_dataset("needle-code", n=4, passages=6, seed=2, data_dir=data_dir)
    other = load_dataset("needle-code", n=4, passages=6, seed=2, haystack=haystack, data_dir=data_dir)
    assert [e.id for e in other] == [f"needle-code-{haystack}_2_{i}" for i in range(4)]
    assert [(e.answers, e.question) for e in other] == [(e.answers, e.question) for e in base]
    pool = set(_haystack_docs(data_dir, haystack))
    for e in other:
        needle = e.meta["needle"]
        assert [needle in d for d in e.documents].count(True) == 1
        others = [d for i, d in enumerate(e.documents) if i != e.meta["gold_index"]]
        assert all(d in pool for d in others) and len(set(e.documents)) == 6
        assert e.documents[e.meta["gold_index"]].replace(needle + " ", "").replace(" " + needle, "") in pool


def _haystack_docs(data_dir, haystack):
    from kvstash.bench.datasets import FILES, _haystack, data_file

    return _haystack(data_file(FILES["musique"], data_dir), haystack, "t")


def test_needle_unknown_haystack(data_dir):
    with pytest.raises(ValueError, match="haystack='nq'; choose one of: musique, wikimqa, squad"):
        load_dataset("needle", n=1, passages=3, haystack="nq", data_dir=data_dir)
