"""Dense codecs: K and V as raw little-endian floats (``fp32``, ``fp16``, ``bf16``), keys then values."""

from __future__ import annotations

import math
import sys
from typing import ClassVar

import torch

from kvstash.store.codec import Codec, Shape4

if sys.byteorder != "little":  # torch.frombuffer reads native order; the stored format is little-endian
    raise ImportError("kvstash dense codecs need a little-endian host")


class DenseCodec(Codec):
    """Stores each element as ``storage_dtype``; decoding casts back to the dtype the caller asks for."""

    storage_dtype: ClassVar[torch.dtype]

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> bytes:
        if keys.shape != values.shape:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape")
        # both: [layers, kv_heads, tokens, head_dim] -> one flat [2 * numel] buffer
        flat = torch.cat([keys.reshape(-1), values.reshape(-1)]).to("cpu", self.storage_dtype)
        return flat.contiguous().view(torch.uint8).numpy().tobytes()

    def decode(self, data: bytes | memoryview, shape: Shape4, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        view = memoryview(data).cast("B")
        expected = self.encoded_nbytes(shape)
        if view.nbytes != expected:
            raise ValueError(f"{self.name} payload is {view.nbytes} bytes, expected {expected} for {shape}")
        if expected == 0:  # frombuffer refuses empty buffers
            empty = torch.empty(shape, dtype=dtype)
            return empty, empty.clone()
        if view.readonly:  # frombuffer needs a writable buffer; copy once (tensors never alias a cache entry)
            view = memoryview(bytearray(view))
        numel = expected // (2 * self.storage_dtype.itemsize)
        flat = torch.frombuffer(view, dtype=self.storage_dtype, count=2 * numel)
        keys, values = flat[:numel].view(shape), flat[numel:].view(shape)
        return keys.to(dtype), values.to(dtype)

    def encoded_nbytes(self, shape: Shape4) -> int:
        return 2 * math.prod(shape) * self.storage_dtype.itemsize


class Fp32Codec(DenseCodec):
    name = "fp32"
    storage_dtype = torch.float32


class Fp16Codec(DenseCodec):
    name = "fp16"
    storage_dtype = torch.float16


class Bf16Codec(DenseCodec):
    name = "bf16"
    storage_dtype = torch.bfloat16
