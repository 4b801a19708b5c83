"""Log-probabilities of chosen tokens, as the server reports them: computed in :class:`kvstash.decoding.Decoding`
from the raw logits (before temperature), one per answer token, handed out once per delta; no cost when off."""

from __future__ import annotations

import math

import pytest
import torch

from kvstash.decoding import Decoding
from kvstash.sampling import SamplingParams, token_logprobs

EOS = 9


class Letters:
    """A tokenizer whose token i is the letter chr(97 + i)."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(97 + i) for i in ids)


def _decoding(**params) -> Decoding:
    return Decoding(Letters(), {EOS}, SamplingParams(max_tokens=8, **params), prompt_tokens=3, context_limit=64)


def _logits(*favourite: int) -> torch.Tensor:
    logits = torch.zeros(10)
    for rank, token in enumerate(favourite):
        logits[token] = 4.0 - rank
    return logits


def test_token_logprobs_are_the_raw_log_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    logprob, top = token_logprobs(logits, 2, 3)
    want = torch.log_softmax(logits, -1)
    assert logprob == pytest.approx(float(want[2]))
    assert [t for t, _ in top] == [0, 1, 2] and [lp for _, lp in top] == pytest.approx(want[:3].tolist())
    assert token_logprobs(logits, 0, 0)[1] == []


def test_each_answer_token_gets_its_logprob_and_eos_none():
    dec = _decoding(logprobs=2)
    assert dec.step(_logits(1, 4)) == "b" and dec.step(_logits(2, 1)) == "c"
    first = dec.new_logprobs()
    assert [(e.token_id, e.token) for e in first] == [(1, "b"), (2, "c")] and dec.new_logprobs() == []
    assert [t.token for t in first[0].top] == ["b", "e"]
    assert first[0].logprob == pytest.approx(float(torch.log_softmax(_logits(1, 4), -1)[1]))
    dec.step(_logits(EOS))
    assert dec.finish_reason == "stop" and dec.new_logprobs() == []  # the end of sequence is no answer token
    result = dec.result(_report(), 0.1, 0.1, 0)
    assert [e.token for e in result.logprobs] == ["b", "c"] and result.completion_tokens == 2


def test_logprobs_are_of_the_model_not_of_the_temperature():
    dec = _decoding(logprobs=1, temperature=2.0, seed=0)
    logits = _logits(3, 5)
    token = dec.choose(logits)
    dec.push(token)
    (entry,) = dec.logprobs
    assert entry.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]))
    assert math.isclose(entry.top[0].logprob, float(torch.log_softmax(logits, -1).max()), rel_tol=1e-6)


def test_off_by_default():
    dec = _decoding()
    dec.step(_logits(1))
    assert dec.logprobs is None and dec.new_logprobs() is None
    assert dec.result(_report(), 0.1, 0.1, 0).logprobs is None


@pytest.mark.parametrize("bad", [-1, 21, 1.5])
def test_sampling_params_check_logprobs(bad):
    with pytest.raises(ValueError, match="logprobs must be None or an integer in"):
        SamplingParams(logprobs=bad)


def _report():
    from kvstash.reuse.report import PrefillReport

    return PrefillReport("full", 3, [])
