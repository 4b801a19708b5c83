"""The LM head, through MKL or oneDNN (:mod:`kvstash.model.linear`), whichever this CPU runs faster.

The head is the model's largest matmul ([vocab, hidden] = 49152 x 576 for SmolLM2) and runs on every decoded
token. For a weight that tall and few rows, MKL's fp32 GEMM is slow on some CPUs: on an AVX2 AMD EPYC (2 threads)
14.1 ms for 1 row and 62.6 ms for 8, where oneDNN takes 7.6 ms and 13.3 ms from a packed copy of the weight
(:func:`kvstash.model.linear.pack`: the head's bytes once more, as the weight is tied to the embeddings; made
only if oneDNN is timed or chosen), ``benchmarks/linear_kernels.py``.
:func:`lm_head` keeps the faster, timed once per machine (:mod:`kvstash.model.choice`); the results agree to
fp32 rounding either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from kvstash.model.choice import choose
from kvstash.model.linear import Linear, onednn_linear, onednn_ready, packing

log = logging.getLogger(__name__)

Head = Linear  # [T, hidden] -> [T, vocab]


def lm_head(linear: torch.nn.Linear) -> Head:
    """``linear`` as a function, through oneDNN where that is measurably faster here (fp32 or bf16 weights
    without a bias only), else the module itself. Chosen once per module and remembered on it."""
    chosen = getattr(linear, "_kvstash_head", None)
    if chosen is None:
        chosen = _choose(linear)
        linear._kvstash_head = chosen
    return chosen


def _choose(linear: torch.nn.Linear) -> Head:
    weight = linear.weight
    if linear.bias is not None or not onednn_ready(weight):
        return linear
    built: list[Head] = []  # the oneDNN head (with its packed copy), made only if timing or the answer needs it

    def fast() -> Head:
        if not built:
            built.append(onednn_linear(weight))
        return built[0]

    try:
        what = f"head {'x'.join(map(str, weight.shape))} {str(weight.dtype).removeprefix('torch.')}"
        what += " packed" if packing() else ""
        chosen = choose(what, _timed(lambda: linear, weight), _timed(fast, weight), margin=0.9)
    except (RuntimeError, AttributeError) as e:  # a torch build without the oneDNN op: keep the module
        log.debug("oneDNN LM head unavailable: %s", e)
        return linear
    log.debug("LM head through %s", "oneDNN" if chosen else "the module")
    return fast() if chosen else linear


def _timed(head: Callable[[], Head], weight: torch.Tensor):
    inputs = {}

    def run(rows: int):
        x = inputs.setdefault(rows, torch.randn(rows, weight.shape[1], dtype=weight.dtype))
        return head()(x)

    return run
