"""Linear layers through oneDNN, and the timing that decides whether a CPU runs them faster that way.

PyTorch sends ``F.linear`` on the CPU to MKL's GEMM. For the few rows of decoding (one per sequence, or eight in
a batch) oneDNN's linear is measurably faster on some CPUs: on an AVX2 AMD EPYC (2 threads) SmolLM2's fused
decoder projections take 95 ms against 184 ms through MKL for 8 rows and 46 against 50 ms for one, its LM head
7.9 against 14.1 ms for one row (``benchmarks/linear_kernels.py``). On others it may not be, so each use
(:mod:`kvstash.model.head`, :mod:`kvstash.model.projections`) keeps the faster, timed once per machine
(:mod:`kvstash.model.choice`); the two agree to fp32 rounding.

oneDNN runs faster still from a copy of the weight laid out in its own blocked format for a batch of
:data:`PACK_ROWS` rows (``mkldnn._reorder_linear_weight``, what inductor's weight freezing does): on the same
EPYC the 30 layers' fused projections take 64 ms for 8 rows against 95 ms reading the weight in place, and
42.5 against 46 ms for one row; the LM head 13.3 against 18.8 ms for 8 rows. The copy is held next to the
weight (the model's modules keep reading theirs), so it costs the weights' bytes once more;
``KVSTASH_PACK_WEIGHTS=0`` reads the weights in place instead (less memory, slower batches). Where a CPU cannot
pack a dtype (bf16 without AVX512), the weight is read in place.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor], torch.Tensor]  # [T, in] -> [T, out]
ROWS = (1, 8)  # decoding one sequence and a batch: a kernel must be no slower at either
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
PACK_ROWS = 16  # the batch oneDNN lays a packed weight out for; any row count runs on it (8-64 measured alike)


def onednn_ready(weight: torch.Tensor) -> bool:
    """Whether oneDNN's linear can take this weight here (a CPU dtype it supports, a torch built with it)."""
    return weight.dtype in ONEDNN_DTYPES and torch.backends.mkldnn.is_available() and weight.is_contiguous()


class OneDNNLinear:
    """``x @ weight.T`` through oneDNN's linear: from a packed copy of ``weight`` [out, in] (see the module's
    docstring), or reading it in place when :func:`packing` is off or this CPU cannot pack its dtype.
    ``packed_bytes``: what the packed copy adds, counted as the weight's bytes (0 when read in place)."""

    def __init__(self, weight: torch.Tensor):
        weight = weight.detach()
        self.weight = pack(weight) if packing() else weight
        self.packed_bytes = weight.numel() * weight.element_size() if self.weight is not weight else 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, None, "none", [], "")


def onednn_linear(weight: torch.Tensor) -> OneDNNLinear:
    """See :class:`OneDNNLinear`."""
    return OneDNNLinear(weight)


def packing() -> bool:
    """``KVSTASH_PACK_WEIGHTS`` (default on), checked."""
    value = os.environ.get("KVSTASH_PACK_WEIGHTS", "1").strip().lower() or "1"
    if value not in ("1", "0", "true", "false", "on", "off"):
        raise ValueError(f"KVSTASH_PACK_WEIGHTS={value!r}: use 1 (pack, faster) or 0 (read in place, less memory)")
    return value in ("1", "true", "on")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of ``weight`` for :data:`PACK_ROWS` rows, or ``weight`` itself where it cannot."""
    try:
        with torch.inference_mode():
            return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
    except (RuntimeError, AttributeError) as e:  # bf16 on a CPU without AVX512, a torch without the op
        log.debug("oneDNN cannot pack a %s weight here (%s): reading it in place", weight.dtype, e)
        return weight


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
