"""The LM head, through whichever of two CPU kernels is faster on this machine, chosen by timing both once.

The head is the model's largest matmul ([vocab, hidden] = 49152 x 576 for SmolLM2), and it runs on every decoded
token. For a weight that tall and few rows, MKL's fp32 GEMM is slow on some CPUs: on an AVX2 AMD EPYC (2 threads)
it takes 11.8 ms for 1 row and 53 ms for 8, where oneDNN with the weight packed once takes 6.3 ms and 18 ms (the
same sums to ~1e-6). Which kernel wins depends on the CPU, so :func:`lm_head` times both at load and keeps the
faster; the results agree to fp32 rounding either way. The packed copy of the weight costs its size in memory
(113 MB for SmolLM2 in fp32), only where it is chosen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

Head = Callable[[torch.Tensor], torch.Tensor]  # [T, hidden] -> [T, vocab]
_ROWS = (1, 8)  # decode with one sequence and with a batch: the head must be no slower at either


def lm_head(linear: torch.nn.Linear) -> Head:
    """``linear`` as a function, through oneDNN with a packed weight where that is measurably faster here
    (fp32 weights without a bias only), else the module itself. Chosen once per module and remembered on it."""
    chosen = getattr(linear, "_kvstash_head", None)
    if chosen is None:
        chosen = _choose(linear)
        linear._kvstash_head = chosen
    return chosen


def _choose(linear: torch.nn.Linear) -> Head:
    weight = linear.weight
    if weight.dtype != torch.float32 or linear.bias is not None or not torch.backends.mkldnn.is_available():
        return linear
    try:
        packed = packed_head(weight)
        with torch.inference_mode():
            plain, fast = _seconds(linear, weight), _seconds(packed, weight)
    except (RuntimeError, AttributeError) as e:  # a torch build without the oneDNN op: keep the module
        log.debug("oneDNN LM head unavailable: %s", e)
        return linear
    log.debug("LM head: module %.1f ms, oneDNN %.1f ms (1 and 8 rows)", plain * 1e3, fast * 1e3)
    return packed if fast < 0.9 * plain else linear


def packed_head(weight: torch.Tensor) -> Head:
    """``x @ weight.T`` through oneDNN's linear with the weight packed once. weight: [vocab, hidden] fp32."""
    packed = weight.detach().to_mkldnn()

    def head(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")

    return head


def _seconds(head: Head, weight: torch.Tensor, repeat: int = 3) -> float:
    """Median time of ``head`` over 1 and over 8 rows, summed."""
    total = 0.0
    for rows in _ROWS:
        x = torch.randn(rows, weight.shape[1])
        head(x)  # first call: allocation, kernel choice
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            head(x)
            times.append(time.perf_counter() - t)
        total += sorted(times)[len(times) // 2]
    return total
