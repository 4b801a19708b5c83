"""Blend's pure selection functions on constructed cases."""

from __future__ import annotations

import torch

from kvstash.reuse.selection import deviation, gate, top_share


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
