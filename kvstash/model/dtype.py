"""The compute dtype: the names we accept, and ``auto``, which picks bf16 only where the CPU computes it natively.

On a CPU with AVX512-BF16 (or AMX) bf16 prefills ~3x faster than fp32 and decodes faster in batches
(docs/benchmarks.md, "Compute dtype"); on one without (AVX2 only) torch emulates bf16 and the same matmul runs
~5x *slower* than fp32. So a default of bf16 is right on one machine and badly wrong on the next: ``auto`` asks
the CPU.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
AUTO = "auto"


def native_bf16() -> bool:
    """True when this CPU has bf16 dot products in hardware (AVX512-BF16 or AMX tiles), as torch sees it."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in checks:
        check = getattr(torch.cpu, name, None)  # private helpers of torch.cpu; absent on some builds
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


def resolve_dtype(name: str, native: bool | None = None) -> str:
    """``name`` as a concrete dtype name: ``auto`` -> bfloat16 where :func:`native_bf16` (or ``native``), else
    float32; any other accepted name as given. ValueError naming the choices for anything else."""
    if name == AUTO:
        return "bfloat16" if (native_bf16() if native is None else native) else "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {name!r}")
    return name


def warn_if_emulated(name: str) -> None:
    """Log a warning when bfloat16 was asked for on a CPU that emulates it (several times slower than float32)."""
    if name == "bfloat16" and not native_bf16():
        log.warning(
            "bfloat16 on this CPU (no AVX512-BF16 or AMX) is emulated and runs several times slower than "
            "float32; use --dtype auto or float32"
        )
