"""Benchmark inputs and scoring: evaluation datasets and answer/logit metrics."""

from __future__ import annotations

from kvstash.bench.datasets import Example, data_file, dataset_options, load_dataset
from kvstash.bench.metrics import (
    Summary,
    answers_agree,
    contains_gold,
    exact_match,
    f1_score,
    kl_divergence,
    logit_margins,
    normalize_answer,
    summarize,
)

__all__ = [
    "Example",
    "Summary",
    "answers_agree",
    "contains_gold",
    "data_file",
    "dataset_options",
    "exact_match",
    "f1_score",
    "kl_divergence",
    "load_dataset",
    "logit_margins",
    "normalize_answer",
    "summarize",
]
