"""Codecs: how a chunk's K and V tensors become bytes in a store, and back.

A codec owns only the tensor payload; the record around it (header, token ids, checksum) is the store's.
New codecs subclass :class:`Codec` and are named in :mod:`kvstash.store.codec_registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

Shape4 = tuple[int, int, int, int]  # [layers, kv_heads, tokens, head_dim]


class Codec(ABC):
    """Turns K/V tensors of shape [layers, kv_heads, tokens, head_dim] into bytes and back."""

    name: ClassVar[str]

    @abstractmethod
    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> bytes:
        """Serialize K and V (same shape). Pure: changes nothing."""

    @abstractmethod
    def decode(self, data: bytes | memoryview, shape: Shape4, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild (keys, values) of ``shape`` in ``dtype``; ValueError if ``data`` has the wrong size."""

    @abstractmethod
    def encoded_nbytes(self, shape: Shape4) -> int:
        """Exact size in bytes of ``encode`` for tensors of this shape."""
