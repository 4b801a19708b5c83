"""KIVI math: bit packing, quantization against a loop reference, error bounds, layout and exact sizes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from kvstash.cache.kivi import (
    Quantized,
    dequantize,
    dequantize_kv,
    pack_bits,
    quantize,
    quantize_kv,
    quantized_nbytes,
    quantized_tensor_nbytes,
    unpack_bits,
)

BITS = (2, 4, 8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ref_quantize(x: torch.Tensor, bits: int, g: int, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One group at a time, scalar numpy fp32/fp16 arithmetic: (codes, scale, zero) with ``axis`` last."""
    qmax = np.float32(2**bits - 1)
    xm = x.movedim(axis, -1).numpy().astype(np.float32)
    n = xm.shape[-1]
    ng = math.ceil(n / g)
    codes = np.zeros(xm.shape, dtype=np.uint8)
    scale = np.zeros((*xm.shape[:-1], ng), dtype=np.float16)
    zero = np.zeros_like(scale)
    for idx in np.ndindex(*xm.shape[:-1]):
        for gi in range(ng):
            vals = xm[idx][gi * g : (gi + 1) * g]
            mn, mx = vals.min(), vals.max()
            z = np.float16(mn)
            if np.float32(z) > mn:
                z = np.nextafter(z, np.float16(-np.inf))
            s32 = np.float32((mx - np.float32(z)) / qmax)
            s = np.float16(s32)
            if np.float32(s) < s32:
                s = np.nextafter(s, np.float16(np.inf))
            scale[idx][gi], zero[idx][gi] = s, z
            div = np.float32(s) if s > 0 else np.float32(1)
            for j, v in enumerate(vals):
                c = np.round(np.float32((v - np.float32(z)) / div))
                codes[idx][gi * g + j] = int(min(max(c, 0), qmax))
    return codes, scale, zero


def _elementwise_scale(q: Quantized) -> torch.Tensor:
    s = q.scale.float().repeat_interleave(q.group_size, dim=q.axis)
    return s.narrow(q.axis, 0, q.shape[q.axis])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 3, 7, 13, 1001])
def test_pack_unpack_round_trip(bits: int, n: int) -> None:
    q = torch.randint(0, 2**bits, (n,), generator=_gen(n), dtype=torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n), q)


def test_pack_layout_first_value_in_low_bits() -> None:
    q = torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8)
    assert pack_bits(q, 2).tolist() == [0b00_11_10_01, 0b11]
    assert pack_bits(torch.tensor([0xA, 0x5, 0xF], dtype=torch.uint8), 4).tolist() == [0x5A, 0x0F]


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        pack_bits(torch.zeros(4, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="bytes hold"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 2, 9)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("g", "axis"), [(4, -1), (5, -1), (4, 1), (3, 1), (16, 0)])
def test_quantize_matches_reference(bits: int, g: int, axis: int) -> None:
    x = torch.randn(3, 10, 7, generator=_gen(bits + g)) * 3
    x[1, :, 2] = 0.75  # a constant run
    q = quantize(x, bits, g, axis)
    codes, scale, zero = _ref_quantize(x, bits, g, axis)
    ax = axis % x.dim()
    got_codes = unpack_bits(q.data, bits, x.numel()).view(x.shape).movedim(ax, -1)
    assert np.array_equal(got_codes.numpy(), codes)
    assert np.array_equal(q.scale.movedim(ax, -1).numpy(), scale)
    assert np.array_equal(q.zero.movedim(ax, -1).numpy(), zero)
    assert q.scale.dtype == q.zero.dtype == torch.float16
    # dequantize is zero + code * scale in fp32
    n = x.shape[ax]
    zero_e = torch.from_numpy(zero.astype(np.float32)).repeat_interleave(g, -1)[..., :n]
    scale_e = torch.from_numpy(scale.astype(np.float32)).repeat_interleave(g, -1)[..., :n]
    want = torch.from_numpy(codes).float() * scale_e + zero_e
    assert torch.equal(dequantize(q).movedim(ax, -1), want)


@pytest.mark.parametrize(("bits", "axis"), list(itertools.product(BITS, [2, 3])))
def test_error_bound(bits: int, axis: int) -> None:
    x = torch.randn(2, 3, 70, 40, generator=_gen(bits)) * torch.rand(1, 1, 1, 40, generator=_gen(7)) * 5
    q = quantize(x, bits, 32, axis)
    err = (dequantize(q) - x).abs()
    # zero is rounded down and scale up to fp16, so codes never clamp: scale/2 plus fp32 arithmetic slack
    bound = _elementwise_scale(q) / 2 + 1e-6 * (1 + x.abs())
    assert (err <= bound).all(), (err - bound).max()
    assert dequantize(q).shape == x.shape and dequantize(q).dtype == torch.float32


def test_bit_widths_trade_error() -> None:
    x = torch.randn(4, 64, 64, generator=_gen(3))
    errs = [(dequantize(quantize(x, b, 32, -1)) - x).abs().mean().item() for b in BITS]
    assert errs[0] > 3 * errs[1] > 9 * errs[2]


@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_exact(bits: int) -> None:
    x = torch.randn(2, 64, 8, generator=_gen(bits))
    x[0, :32, 3] = 0.5  # exactly one key group (tokens 0..31 of channel 3)
    x[1, 32:, :] = -2.25  # a whole group of tokens on every channel
    x[1, :32, 5] = 0.0
    q = quantize(x, bits, 32, axis=1)
    d = dequantize(q)
    for sl in [(0, slice(0, 32), 3), (1, slice(32, 64)), (1, slice(0, 32), 5)]:
        assert torch.equal(d[sl], x[sl])
    # a constant not representable in fp16 is within fp16 rounding
    c = torch.full((4, 32), 0.1)
    assert (dequantize(quantize(c, bits, 32, 1)) - c).abs().max() < 1e-4


def test_quantize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="fp16"):
        quantize(torch.tensor([0.0, float("nan")]), 4)
    with pytest.raises(ValueError, match="fp16"):
        quantize(torch.tensor([-1e6, 0.0]), 4)
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.zeros(4), 4, group_size=0)
    with pytest.raises(ValueError, match="out of range"):
        quantize(torch.zeros(4), 4, axis=1)


def test_keys_per_channel_values_per_token() -> None:
    k = torch.randn(1, 2, 64, 64, generator=_gen(1)) * 0.1
    v = k.clone()
    base = quantize_kv(k, v, 4, 32)
    k[0, 1, 5, 3] = v[0, 1, 5, 3] = 100.0  # one outlier
    out = quantize_kv(k, v, 4, 32)
    # keys: scale per (layer, head, token group, channel) -> only token group 0 of channel 3 of head 1
    assert out.keys.scale.shape == (1, 2, 2, 64)
    changed = (out.keys.scale != base.keys.scale).nonzero().tolist()
    assert changed == [[0, 1, 0, 3]]
    # values: scale per (layer, head, token, channel group) -> only channel group 0 of token 5 of head 1
    assert out.values.scale.shape == (1, 2, 64, 2)
    assert (out.values.scale != base.values.scale).nonzero().tolist() == [[0, 1, 5, 0]]
    # every element outside the affected groups dequantizes exactly as before
    dk, dv = dequantize_kv(out)
    bk, bv = dequantize_kv(base)
    key_group = torch.zeros_like(k, dtype=torch.bool)
    key_group[0, 1, :32, 3] = True
    val_group = torch.zeros_like(v, dtype=torch.bool)
    val_group[0, 1, 5, :32] = True
    assert torch.equal(dk[~key_group], bk[~key_group])
    assert torch.equal(dv[~val_group], bv[~val_group])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(2, 3, 70, 40), (1, 1, 1, 1), (3, 2, 64, 64), (1, 5, 33, 7)])
def test_exact_sizes(bits: int, shape: tuple[int, ...]) -> None:
    k, v = torch.randn(shape, generator=_gen(0)), torch.randn(shape, generator=_gen(1))
    qkv = quantize_kv(k, v, bits, 32)
    assert qkv.nbytes == quantized_nbytes(shape, bits, 32)
    assert qkv.keys.nbytes == quantized_tensor_nbytes(shape, bits, 32, -2)
    k2, v2 = dequantize_kv(qkv)
    assert k2.shape == v2.shape == shape


def test_size_formula_by_hand() -> None:
    # [2, 3, 70, 40] at 4 bits, G=32: codes 16800 / 2 bytes each; key groups 2*3*3*40, value 2*3*70*2
    assert quantized_nbytes((2, 3, 70, 40), 4, 32) == 2 * 8400 + 4 * (720 + 840)
