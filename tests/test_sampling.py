"""Sampling parameters are validated with clear errors."""

from __future__ import annotations

import pytest

from kvstash.sampling import SamplingParams


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
