"""Codecs: how a chunk's K and V tensors become bytes in a store, and back.

A codec owns only the tensor payload; the record around it (header, token ids, checksum) is the store's.
New codecs subclass :class:`Codec` and register with :func:`register_codec`.
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


CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    CODECS[cls.name] = cls
    return cls


def get_codec(name: str) -> Codec:
    """The codec a user names (``fp16``, ``kivi4``, ...). Unknown name: ValueError listing the known ones."""
    _load_builtin_codecs()
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of: {', '.join(sorted(CODECS))}")
    return CODECS[name]()


def _load_builtin_codecs() -> None:
    # Codecs defined in other modules register on import.
    import kvstash.quant  # noqa: F401
    import kvstash.store.dense_codec  # noqa: F401
