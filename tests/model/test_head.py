"""The LM head: the oneDNN kernel computes what the module does, and the choice is made once per module."""

from __future__ import annotations

import pytest
import torch

from kvstash.model.head import lm_head, packed_head

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_the_packed_head_equals_the_module(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 1000, bias=False)
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        want, got = linear(x), packed_head(linear.weight)(x)
    assert got.shape == want.shape == (rows, 1000)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_the_choice_is_made_once_and_gives_the_modules_numbers():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 1000, bias=False)
    head = lm_head(linear)
    assert lm_head(linear) is head  # remembered on the module, not timed again
    x = torch.randn(4, 64)
    with torch.inference_mode():
        assert torch.allclose(head(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make", [lambda: torch.nn.Linear(64, 100, bias=True), lambda: torch.nn.Linear(64, 100, bias=False).half()]
)
def test_a_head_with_a_bias_or_not_fp32_stays_the_module(make):
    linear = make()
    assert lm_head(linear) is linear


def test_the_engines_logits_equal_the_modules(engine):
    """Whichever kernel the runner chose, its logits are the model's own LM head's (fp32 rounding)."""
    r = engine.runner
    h = torch.randn(5, engine.lm.model.config.hidden_size)
    with torch.inference_mode():
        want = engine.lm.model.lm_head(engine.lm.model.model.norm(h)).float()
    assert torch.allclose(r.logits(h), want, atol=1e-4, rtol=1e-5)
