"""Answer metrics (SQuAD-style), logit divergence and percentile summaries for the benchmarks."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(golds: str | Sequence[str]) -> list[str]:
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("golds is empty: pass at least one reference answer")
    return golds


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)  # both empty agree; one empty shares nothing
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: str | Sequence[str]) -> float:
    """Token F1 between the normalized prediction and each gold answer; the max over golds."""
    return max(_token_f1(prediction, g) for g in _as_list(golds))


def exact_match(prediction: str, golds: str | Sequence[str]) -> bool:
    """True when the normalized prediction equals some normalized gold answer."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(g) for g in _as_list(golds))


def contains_gold(prediction: str, golds: str | Sequence[str]) -> bool:
    """True when some non-empty normalized gold appears in the normalized prediction as whole tokens.

    Matching on token boundaries keeps "1" from being found inside "10".
    """
    pred = f" {normalize_answer(prediction)} "
    for gold in _as_list(golds):
        norm = normalize_answer(gold)
        if norm and f" {norm} " in pred:
            return True
    return False


def answers_agree(a: str, b: str) -> bool:
    """True when two generated answers are equal after normalization (e.g. reuse vs full prefill)."""
    return normalize_answer(a) == normalize_answer(b)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from logits, in float64.

    p_logits, q_logits: [T, V] (or [V]); returns [T] (or a scalar), in nats.
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(p_logits.shape)} vs {tuple(q_logits.shape)}")
    log_p = torch.log_softmax(p_logits.double(), dim=-1)  # [T, V]
    log_q = torch.log_softmax(q_logits.double(), dim=-1)  # [T, V]
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [T]


def logit_margins(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """How firmly each token of an answer was chosen: its logit minus the best other token's, in float32.

    logits: [T, V] teacher-forced along ``ids`` (row i predicts ``ids[i]``); returns [T]. A margin below 0
    means greedy decoding leaves the answer at that token; near 0 the answer hangs on a near tie.
    """
    if logits.dim() != 2 or logits.shape[0] != len(ids):
        raise ValueError(f"need one logits row per answer token: {tuple(logits.shape)} for {len(ids)} tokens")
    rows, tgt = torch.arange(len(ids)), torch.as_tensor(list(ids), dtype=torch.long)
    lg = logits.float().clone()  # [T, V]; a copy, so inference-mode logits can be written
    own = lg[rows, tgt]  # [T], a copy (advanced indexing)
    lg[rows, tgt] = float("-inf")
    return own - lg.amax(dim=-1)  # [T]


@dataclass(frozen=True)
class Summary:
    """Median, 90th percentile (linear interpolation, as numpy's default) and mean of a sample."""

    median: float
    p90: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if len(values) == 0:
            raise ValueError("cannot summarize an empty list of values")
        xs = sorted(float(v) for v in values)
        return cls(median=_percentile(xs, 0.5), p90=_percentile(xs, 0.9), mean=math.fsum(xs) / len(xs))


def _percentile(sorted_xs: list[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """{"median", "p90", "mean"} of values; raises ValueError on an empty list."""
    return asdict(Summary.of(values))
