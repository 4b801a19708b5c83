"""ChunkKV: the keys and values of every layer for one segment, as computed standalone."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkKV:
    """One segment's KV, the unit the store keeps and the reuse methods re-position.

    Keys are stored *after* rotary embedding at ``positions`` (what the model wrote into its cache), so a
    reuse method re-positions them by rotating from ``positions`` to the new ones.
    """

    token_ids: list[int]  # the segment's token ids; compared on read so a hash collision is a miss
    keys: torch.Tensor  # [layers, kv_heads, tokens, head_dim]
    values: torch.Tensor  # [layers, kv_heads, tokens, head_dim]
    positions: torch.Tensor  # [tokens] int64: absolute positions the keys were rotated to

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        assert self.keys.shape == self.values.shape, (self.keys.shape, self.values.shape)
        assert self.keys.dim() == 4 and self.keys.shape[2] == n, (self.keys.shape, n)
        assert self.positions.shape == (n,), (self.positions.shape, n)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V tensors as they are held now."""
        return self.keys.numel() * self.keys.element_size() * 2
