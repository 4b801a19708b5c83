"""One layer's growing decode-time K/V, held as KIVI groups plus a full-precision residual of recent tokens.

Keys are quantized per channel, in groups of G consecutive tokens, so a key group can only be quantized once
G tokens exist; until then (and for the ``residual`` most recent tokens always) tokens stay in full
precision. Quantized tokens never change again, so appending is cheap and deterministic: the result does
not depend on how the tokens were split across ``append`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstash.quant import SUPPORTED_BITS, Quantized, dequantize, quantize


@dataclass(frozen=True)
class KVQuantConfig:
    """How a decode cache quantizes: ``bits`` per code, ``group_size`` G, ``residual`` R recent tokens kept
    exact (None: R = G)."""

    bits: int = 4
    group_size: int = 32
    residual: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"--kv-bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.group_size < 4 or self.group_size % 4:
            # a whole token group then packs into whole bytes, so groups can be concatenated as bytes
            raise ValueError(f"group_size must be a positive multiple of 4, got {self.group_size}")
        if self.residual is None:
            object.__setattr__(self, "residual", self.group_size)
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0 tokens, got {self.residual}")


class QuantizedLayerCache:
    """K/V of one layer, ``[kv_heads, tokens, head_dim]``: quantized token groups + a full-precision tail.

    Invariant: the residual holds the newest ``R <= r < R + G`` tokens (fewer while fewer exist); everything
    older is quantized, in whole groups of G tokens, in order.
    """

    def __init__(self, config: KVQuantConfig | None = None) -> None:
        self.config = config or KVQuantConfig()
        self._blocks: list[tuple[Quantized, Quantized]] = []  # (keys, values), each [n_groups, heads, G, dim]
        self._k_res: torch.Tensor | None = None  # [kv_heads, r, head_dim], dtype as appended
        self._v_res: torch.Tensor | None = None  # [kv_heads, r, head_dim]
        self._num_quantized = 0  # tokens held in _blocks

    @property
    def num_tokens(self) -> int:
        return self._num_quantized + self.num_residual

    @property
    def num_quantized(self) -> int:
        return self._num_quantized

    @property
    def num_residual(self) -> int:
        return 0 if self._k_res is None else self._k_res.shape[1]

    @property
    def residual(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The full-precision (keys, values) of the newest tokens, or None before the first append."""
        return None if self._k_res is None else (self._k_res, self._v_res)

    @property
    def nbytes(self) -> int:
        """Bytes actually held: packed codes, fp16 scales/zeros, and the residual tensors."""
        held = sum(k.nbytes + v.nbytes for k, v in self._blocks)
        if self._k_res is not None:
            held += 2 * self._k_res.numel() * self._k_res.element_size()
        return held

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add ``t`` new tokens (k, v: ``[kv_heads, t, head_dim]``); quantizes the oldest residual tokens in
        whole groups once more than ``R + G - 1`` are waiting. Raises ValueError on a shape mismatch."""
        if k.shape != v.shape or k.dim() != 3:
            raise ValueError(
                f"append takes k and v of one [kv_heads, tokens, head_dim] shape, got {tuple(k.shape)} "
                f"and {tuple(v.shape)}"
            )
        if self._k_res is None:
            self._k_res, self._v_res = k.clone(), v.clone()  # don't alias the caller's buffers
        else:
            if k.shape[0] != self._k_res.shape[0] or k.shape[2] != self._k_res.shape[2]:
                raise ValueError(
                    f"this cache holds {self._k_res.shape[0]} heads x {self._k_res.shape[2]} dims, "
                    f"got new tokens of shape {tuple(k.shape)}"
                )
            self._k_res = torch.cat([self._k_res, k], dim=1)
            self._v_res = torch.cat([self._v_res, v], dim=1)
        self._flush()

    def _flush(self) -> None:
        g, r = self.config.group_size, self.config.residual
        n_groups = (self.num_residual - r) // g
        if n_groups <= 0:
            return
        n = n_groups * g
        heads, _, dim = self._k_res.shape
        # [heads, n, dim] -> [n_groups, heads, G, dim]: one key group per (group, head, channel)
        k_old = self._k_res[:, :n].reshape(heads, n_groups, g, dim).transpose(0, 1)
        v_old = self._v_res[:, :n].reshape(heads, n_groups, g, dim).transpose(0, 1)
        bits = self.config.bits
        self._blocks.append((quantize(k_old, bits, g, axis=2), quantize(v_old, bits, g, axis=3)))
        # clone so the residual does not pin the quantized tokens' memory
        self._k_res = self._k_res[:, n:].clone()
        self._v_res = self._v_res[:, n:].clone()
        self._num_quantized += n

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (keys, values) ``[kv_heads, tokens, head_dim]``: dequantized groups, then the residual.
        Changes nothing. Raises ValueError before the first append."""
        if self._k_res is None:
            raise ValueError("the cache is empty: append tokens before materialize()")
        k_parts, v_parts = [], []
        if self._blocks:
            k_parts.append(_dequantize_blocks([k for k, _ in self._blocks]))
            v_parts.append(_dequantize_blocks([v for _, v in self._blocks]))
        k_parts.append(self._k_res.float())
        v_parts.append(self._v_res.float())
        return torch.cat(k_parts, dim=1), torch.cat(v_parts, dim=1)


def _dequantize_blocks(blocks: list[Quantized]) -> torch.Tensor:
    """Blocks of ``[n_groups_i, heads, G, dim]`` -> float32 ``[heads, sum(n_groups_i) * G, dim]``, in one
    dequantize (each block's codes fill whole bytes, so packed bytes concatenate)."""
    first = blocks[0]
    n_groups = sum(b.shape[0] for b in blocks)
    merged = Quantized(
        torch.cat([b.data for b in blocks]),
        torch.cat([b.scale for b in blocks]),
        torch.cat([b.zero for b in blocks]),
        (n_groups, *first.shape[1:]),
        first.bits,
        first.group_size,
        first.axis,
    )
    x = dequantize(merged)  # [n_groups, heads, G, dim]
    heads, g, dim = first.shape[1:]
    return x.transpose(0, 1).reshape(heads, n_groups * g, dim)
