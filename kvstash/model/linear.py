"""Linear layers through oneDNN, and the timing that decides whether a CPU runs them faster that way.

PyTorch sends ``F.linear`` on the CPU to MKL's GEMM. For the few rows of decoding (one per sequence, or eight in
a batch) oneDNN's linear is measurably faster on some CPUs: on an AVX2 AMD EPYC (2 threads) SmolLM2's decoder
projections take 83 ms against 100 ms for 8 rows and 43 against 51 ms for one, its LM head 6 against 12 ms for
one row. On others it may not be, so each use (:mod:`kvstash.model.head`, :mod:`kvstash.model.projections`)
keeps the faster, timed once per machine (:mod:`kvstash.model.choice`). oneDNN reads the weight as it is (no
packed copy, no extra memory); the two agree to fp32 rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

Linear = Callable[[torch.Tensor], torch.Tensor]  # [T, in] -> [T, out]
ROWS = (1, 8)  # decoding one sequence and a batch: a kernel must be no slower at either
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def onednn_ready(weight: torch.Tensor) -> bool:
    """Whether oneDNN's linear can take this weight here (a CPU dtype it supports, a torch built with it)."""
    return weight.dtype in ONEDNN_DTYPES and torch.backends.mkldnn.is_available() and weight.is_contiguous()


def onednn_linear(weight: torch.Tensor) -> Linear:
    """``x @ weight.T`` through oneDNN's linear, reading ``weight`` [out, in] in place (no copy)."""
    weight = weight.detach()

    def linear(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [], "")

    return linear


def seconds(run: Callable[[int], object], repeat: int = 3) -> float:
    """Median wall time of ``run(rows)`` over ``repeat`` calls (after one warm-up), summed over :data:`ROWS`."""
    total = 0.0
    for rows in ROWS:
        run(rows)  # first call: allocation, kernel selection
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            run(rows)
            times.append(time.perf_counter() - t)
        total += sorted(times)[len(times) // 2]
    return total


def faster(plain: Callable[[int], object], candidate: Callable[[int], object], margin: float = 0.9) -> bool:
    """Whether ``candidate`` runs in under ``margin`` of ``plain``'s time (both timed by :func:`seconds`)."""
    with torch.inference_mode():
        return seconds(candidate) < margin * seconds(plain)
