"""The KIVI store codecs (``kivi8``, ``kivi4``, ``kivi2``): chunk KV packed with :mod:`kvstash.cache.kivi`."""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch

from kvstash.cache.kivi import Quantized, dequantize, grouped_shape, quantize_kv, quantized_nbytes
from kvstash.store.codec import Codec, Shape4


class KiviCodec(Codec):
    """Quantized K/V in one bytes object, laid out as (all native-endian, no padding between parts):

    ``key scale | key zero | value scale | value zero`` (fp16, C order), then
    ``key codes | value codes`` (bit-packed).
    The fp16 parts come first so each starts at an even offset and can be viewed in place on decode.
    """

    bits: ClassVar[int]
    group_size: ClassVar[int] = 32

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> bytes:
        if keys.dim() != 4:
            raise ValueError(f"{self.name} takes [layers, kv_heads, tokens, head_dim], not {keys.shape}")
        qkv = quantize_kv(keys, values, self.bits, self.group_size)
        k, v = qkv
        parts = [k.scale, k.zero, v.scale, v.zero, k.data, v.data]
        buf = torch.cat([p.contiguous().reshape(-1).view(torch.uint8) for p in parts])
        return buf.cpu().numpy().tobytes()

    def decode(self, data: bytes | memoryview, shape: Shape4, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        shape = tuple(shape)
        size = memoryview(data).nbytes
        if size != self.encoded_nbytes(shape):
            raise ValueError(
                f"{self.name}: got {size} bytes, but shape {shape} encodes to {self.encoded_nbytes(shape)}; "
                "the record is corrupt or was written with another codec or shape"
            )
        with warnings.catch_warnings():  # read-only buffer: we only read it (every result is a new tensor)
            warnings.simplefilter("ignore", UserWarning)
            buf = torch.frombuffer(data, dtype=torch.uint8)
        k_sshape = grouped_shape(shape, self.group_size, 2)
        v_sshape = grouped_shape(shape, self.group_size, 3)
        code_bytes = -(-math.prod(shape) * self.bits // 8)
        sizes = [2 * math.prod(k_sshape)] * 2 + [2 * math.prod(v_sshape)] * 2 + [code_bytes] * 2
        k_s, k_z, v_s, v_z, k_d, v_d = torch.split(buf, sizes)
        k = Quantized(k_d, _fp16(k_s, k_sshape), _fp16(k_z, k_sshape), shape, self.bits, self.group_size, 2)
        v = Quantized(v_d, _fp16(v_s, v_sshape), _fp16(v_z, v_sshape), shape, self.bits, self.group_size, 3)
        return dequantize(k).to(dtype), dequantize(v).to(dtype)

    def encoded_nbytes(self, shape: Shape4) -> int:
        return quantized_nbytes(tuple(shape), self.bits, self.group_size)


def _fp16(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return raw.view(torch.float16).view(shape)


class Kivi8Codec(KiviCodec):
    name = "kivi8"
    bits = 8


class Kivi4Codec(KiviCodec):
    name = "kivi4"
    bits = 4
    # fp16 scale + zero per group cost 32 / G bits per element: at G=32 kivi4 would be 5/16 = 0.3125x fp16;
    # G=64 gives 4.5/16 = 0.281x.
    group_size = 64


class Kivi2Codec(KiviCodec):
    name = "kivi2"
    bits = 2
