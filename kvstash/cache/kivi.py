"""KIVI-style KV quantization: asymmetric min-max in groups, keys per channel, values per token.

Keys have a few outlier *channels*, so each key group is G consecutive tokens of one channel; values have
no channel structure, so each value group is G consecutive channels of one token (KIVI, Liu et al. 2024).

Every group stores an fp16 ``scale`` and ``zero`` (the group minimum) and its elements as ``bits``-bit codes:
``q = clamp(round((x - zero) / scale), 0, 2**bits - 1)``, ``x ≈ zero + q * scale``. Scale and zero are
rounded to fp16 *outward* (zero down, scale up) before the codes are computed, so ``zero <= x <=
zero + (2**bits - 1) * scale`` holds for every element and the error is at most ``scale / 2``.

Padding: when the grouped axis is not a multiple of G, the last group is padded with copies of the last
element (so its min/max are those of the real elements); only the real elements' codes are stored, and
dequantize returns the original shape.

Codes are bit-packed little-end first: value ``i`` of a byte sits in bits ``[i*bits, (i+1)*bits)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

SUPPORTED_BITS = (2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the codes of ``q`` (uint8, any shape, flattened in C order) into ``ceil(numel * bits / 8)`` bytes.

    Only the low ``bits`` bits of each value are kept; the last byte is zero-filled.
    """
    _check_bits(bits)
    if q.dtype != torch.uint8:
        raise ValueError(f"pack_bits takes uint8 codes, got {q.dtype}; convert them with .to(torch.uint8)")
    flat = q.reshape(-1)
    if bits == 8:
        return flat.clone()
    per = 8 // bits
    pad = -flat.numel() % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)  # [per]
    fields = (flat.view(-1, per) & (2**bits - 1)) << shifts  # [bytes, per], disjoint bit ranges
    return fields.sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    per = 8 // bits
    if n > packed.numel() * per:
        raise ValueError(f"{packed.numel()} bytes hold {packed.numel() * per} {bits}-bit codes, not {n}")
    flat = packed.reshape(-1)
    if bits == 8:
        return flat[:n].clone()
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # [per]
    codes = (flat.unsqueeze(1) >> shifts) & (2**bits - 1)  # [bytes, per]
    return codes.reshape(-1)[:n]


class Quantized(NamedTuple):
    """One tensor quantized in groups of ``group_size`` along ``axis``."""

    data: torch.Tensor  # uint8 [ceil(numel * bits / 8)]: the codes in the tensor's own C order, bit-packed
    scale: torch.Tensor  # fp16, ``shape`` with ``axis`` cut to ceil(n / group_size) groups
    zero: torch.Tensor  # fp16, same shape as scale: each group's minimum, rounded down to fp16
    shape: tuple[int, ...]  # shape of the original tensor
    bits: int
    group_size: int
    axis: int  # non-negative

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes plus fp16 scales and zeros."""
        return self.data.numel() + 2 * (self.scale.numel() + self.zero.numel())


class QuantizedKV(NamedTuple):
    keys: Quantized  # grouped along tokens (axis -2): per channel
    values: Quantized  # grouped along head_dim (axis -1): per token

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def _fp16_toward(x: torch.Tensor, down: bool) -> torch.Tensor:
    """fp32 -> fp16, rounding toward -inf (``down``) or +inf instead of to nearest."""
    h = x.half()
    raw = h.view(torch.int16)
    if down:
        off = h.float() > x
        # one fp16 step toward -inf: positive -> raw-1, +/-0 -> smallest negative subnormal, negative -> raw+1
        step = torch.where(h > 0, raw - 1, torch.where(h == 0, torch.full_like(raw, -32767), raw + 1))
    else:  # only used for scales, which are >= 0: one step up is raw+1 (0 -> smallest subnormal)
        off = h.float() < x
        step = raw + 1
    return torch.where(off, step, raw).view(torch.float16)


def grouped_shape(shape: tuple[int, ...], group_size: int, axis: int) -> tuple[int, ...]:
    return (*shape[:axis], -(-shape[axis] // group_size), *shape[axis + 1 :])


def _check_group(shape: tuple[int, ...], bits: int, group_size: int, axis: int) -> int:
    _check_bits(bits)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} is out of range for a tensor of shape {tuple(shape)}")
    axis %= len(shape)
    if shape[axis] == 0:
        raise ValueError(f"cannot quantize shape {tuple(shape)}: axis {axis} is empty")
    return axis


def quantize(x: torch.Tensor, bits: int, group_size: int = 32, axis: int = -1) -> Quantized:
    """Asymmetric min-max quantization of ``x`` in groups of ``group_size`` consecutive elements on ``axis``.

    Pure. Raises ValueError for unsupported bits/group size or values an fp16 scale/zero cannot hold
    (non-finite, or beyond fp16 range).
    """
    axis = _check_group(tuple(x.shape), bits, group_size, axis)
    qmax = 2**bits - 1
    n = x.shape[axis]
    ng = -(-n // group_size)
    xf = x.float()
    pad = ng * group_size - n
    if pad:  # replicate the last element so the padded group's min/max are the real ones
        edge = xf.narrow(axis, n - 1, 1)
        xf = torch.cat([xf, edge.expand(*x.shape[:axis], pad, *x.shape[axis + 1 :])], dim=axis)
    groups = xf.unflatten(axis, (ng, group_size))  # [..., ng, G, ...]
    mn, mx = torch.aminmax(groups, dim=axis + 1)  # [..., ng, ...]
    zero = _fp16_toward(mn, down=True)
    z = zero.float()
    scale = _fp16_toward((mx - z) / qmax, down=False)
    if not bool((torch.isfinite(zero).all() & torch.isfinite(scale).all()).item()):
        raise ValueError(
            "cannot quantize: input has NaN/inf or values beyond the fp16 range (|x| > 65504); "
            "store this tensor with an fp16/fp32 codec instead"
        )
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # constant group: every x == zero, code 0
    codes = ((groups - z.unsqueeze(axis + 1)) / s.unsqueeze(axis + 1)).round_().clamp_(0, qmax)
    codes = codes.flatten(axis, axis + 1).narrow(axis, 0, n).to(torch.uint8)  # x.shape
    return Quantized(pack_bits(codes, bits), scale, zero, tuple(x.shape), bits, group_size, axis)


def dequantize(q: Quantized) -> torch.Tensor:
    """float32 tensor of ``q.shape``: ``zero + code * scale`` per element. Pure."""
    axis, g = q.axis, q.group_size
    n = q.shape[axis]
    ng = q.scale.shape[axis]
    codes = unpack_bits(q.data, q.bits, math.prod(q.shape)).view(q.shape).float()
    pad = ng * g - n
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*q.shape[:axis], pad, *q.shape[axis + 1 :])], dim=axis)
    groups = codes.unflatten(axis, (ng, g))  # [..., ng, G, ...]
    x = groups * q.scale.float().unsqueeze(axis + 1) + q.zero.float().unsqueeze(axis + 1)
    return x.flatten(axis, axis + 1).narrow(axis, 0, n)


def quantize_kv(keys: torch.Tensor, values: torch.Tensor, bits: int, group_size: int = 32) -> QuantizedKV:
    """KIVI layout for ``[..., tokens, head_dim]`` K/V: keys per channel, values per token. Pure."""
    if keys.shape != values.shape or keys.dim() < 2:
        raise ValueError(
            f"keys and values must share one [..., tokens, head_dim] shape, got {tuple(keys.shape)} "
            f"and {tuple(values.shape)}"
        )
    return QuantizedKV(quantize(keys, bits, group_size, axis=-2), quantize(values, bits, group_size, axis=-1))


def dequantize_kv(qkv: QuantizedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) as float32 tensors of the original shape."""
    return dequantize(qkv.keys), dequantize(qkv.values)


def quantized_tensor_nbytes(shape: tuple[int, ...], bits: int, group_size: int, axis: int) -> int:
    """Exact ``quantize(x, bits, group_size, axis).nbytes`` for an ``x`` of this shape."""
    axis = _check_group(tuple(shape), bits, group_size, axis)
    n_groups = math.prod(grouped_shape(tuple(shape), group_size, axis))
    return -(-math.prod(shape) * bits // 8) + 4 * n_groups


def quantized_nbytes(shape: tuple[int, ...], bits: int, group_size: int = 32) -> int:
    """Exact ``quantize_kv(k, v, bits, group_size).nbytes`` for K and V of ``[..., tokens, head_dim]``."""
    shape = tuple(shape)
    return quantized_tensor_nbytes(shape, bits, group_size, -2) + quantized_tensor_nbytes(shape, bits, group_size, -1)
