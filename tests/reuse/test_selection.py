"""Blend's pure selection functions on constructed cases."""

from __future__ import annotations

import torch

from kvstash.reuse.selection import deviation, gate, spans, top_share, within


def test_selection_functions_on_constructed_cases():
    fresh = torch.zeros(1, 4, 2)
    old = torch.zeros(1, 4, 2)
    old[0, 2] = torch.tensor([3.0, 4.0])  # token 2 deviates by 5
    fresh[0, :] = 1.0
    dev, rel = deviation(fresh, old)
    assert dev.argmax().item() == 2
    assert torch.allclose(dev, torch.tensor([2.0**0.5, 2.0**0.5, (4.0 + 9.0) ** 0.5, 2.0**0.5]))
    assert torch.allclose(rel, dev / 2.0**0.5)  # relative to the fresh norm, sqrt(2) here
    assert top_share(torch.tensor([0.1, 0.9, 0.5, 0.7]), 2).tolist() == [False, True, False, True]
    assert not top_share(torch.tensor([0.1, 0.9]), 0).any()
    chosen, fired = gate(torch.tensor([0.1, 0.1, 0.9, 0.8]), torch.tensor([0, 0, 1, 1]), 0.5)
    assert fired == 1 and chosen.tolist() == [False, False, True, True]


def test_within_a_work_budget_takes_tokens_in_score_order_while_their_cost_fits():
    score = torch.tensor([0.9, 0.1, 0.8, float("-inf"), 0.5])
    cost = torch.tensor([2.0, 1.0, 3.0, 0.1, 1.0])
    assert within(score, 5.0, cost).tolist() == [True, False, True, False, False]  # 2 + 3; 0.5's 1 more is over
    assert within(score, 6.0, cost).tolist() == [True, False, True, False, True]
    assert within(score, 1.9, cost).tolist() == [False] * 5  # the best one does not fit: nothing after it either
    assert within(score, 100.0, cost).tolist() == [True, True, True, False, True]  # never a -inf score
    assert within(score, 2, None).tolist() == top_share(score, 2).tolist() == [True, False, True, False, False]


def test_spans_take_the_windows_with_the_most_score_clipped_to_their_segment():
    score = torch.tensor([0.0, 0.0, 1.0, 5.0, 1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0])
    segment = torch.tensor([0] * 6 + [1] * 6)
    as_list = lambda mask: mask.nonzero().squeeze(1).tolist()  # noqa: E731
    assert as_list(spans(score, segment, 1, 1)) == [2, 3, 4]  # total 7 beats 6
    assert as_list(spans(score, segment, 2, 1)) == [2, 3, 4, 8, 9, 10]
    assert as_list(spans(score, segment, 5, 1)) == [2, 3, 4, 8, 9, 10]  # what is left scores 0: the search ends
    assert as_list(spans(score, segment, 1, 3)) == [0, 1, 2, 3, 4]  # the first window totalling 7, centre 1
    # the second window (centre 8) stops at its segment's start: token 5 stays out
    assert as_list(spans(score, segment, 2, 3)) == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert not spans(score, segment, 0, 1).any()
    assert as_list(spans(score, segment, 2, 1, limit=5)) == [2, 3, 4]  # the second window would pass the limit
    assert not spans(score, segment, 2, 1, limit=2).any()
    cost = torch.tensor([2.0] * 6 + [1.0] * 6)  # the limit in work: the first window costs 6, the second 3
    assert as_list(spans(score, segment, 2, 1, limit=8, cost=cost)) == [2, 3, 4]
    assert as_list(spans(score, segment, 2, 1, limit=9, cost=cost)) == [2, 3, 4, 8, 9, 10]
    assert not spans(score, segment, 2, 1, limit=5.9, cost=cost).any()
    score[3] = float("-inf")  # never taken, and no window is centred on it
    assert as_list(spans(score, segment, 1, 1)) == [8, 9, 10]
    assert as_list(spans(score, segment, 2, 1)) == [0, 1, 2, 8, 9, 10]  # a tie goes to the first window
