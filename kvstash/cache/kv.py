"""KVCache: each layer's keys and values with the absolute position of every cached token."""

from __future__ import annotations

import torch


class KVCache:
    """Growable per-layer K/V for one sequence, addressed by slot.

    Slots ``[0, length)`` hold tokens. Positions are kept per layer and KV head because an eviction policy may
    keep different tokens per head; while no policy has done so (``uniform``), all rows are equal and
    attention builds one mask per forward instead of one per layer and head.

    ``bias`` (None until :meth:`add_bias`) is an additive attention-logit bias per layer, KV head and slot,
    float32 [L, KVH, cap]: every query's score for that key gets it (blend's ``stale_bias``).
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, capacity: int = 256):
        self.layers, self.kv_heads, self.head_dim, self.dtype = layers, kv_heads, head_dim, dtype
        self.k = torch.empty(layers, kv_heads, capacity, head_dim, dtype=dtype)  # [L, KVH, cap, D]
        self.v = torch.empty_like(self.k)  # [L, KVH, cap, D]
        self.pos = torch.empty(layers, kv_heads, capacity, dtype=torch.long)  # [L, KVH, cap]
        self.length = 0  # slots in use
        self.uniform = True  # every layer and head holds the same positions
        self.bias: torch.Tensor | None = None  # [L, KVH, cap] float32 logit bias per key, or None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def _grow(self, cap: int) -> None:
        """Reallocate to exactly ``cap`` slots, keeping the cached ones."""
        n = self.length
        k = torch.empty(self.layers, self.kv_heads, cap, self.head_dim, dtype=self.dtype)
        v, pos = torch.empty_like(k), torch.empty(self.layers, self.kv_heads, cap, dtype=torch.long)
        k[:, :, :n], v[:, :, :n], pos[:, :, :n] = self.k[:, :, :n], self.v[:, :, :n], self.pos[:, :, :n]
        self.k, self.v, self.pos = k, v, pos
        if self.bias is not None:
            self.bias = self.copy_bias(n, cap)

    def reserve(self, slots: int) -> None:
        """Make room for ``slots`` more tokens now (a scheduler sizes growth to its memory budget)."""
        if self.length + slots > self.capacity:
            self._grow(self.length + slots)

    def append(self, positions: torch.Tensor) -> int:
        """Reserve slots for ``len(positions)`` new tokens at those positions; returns the first slot.

        The caller then fills every layer's K/V for these slots with :meth:`write`.
        """
        t = positions.shape[0]
        start = self.length
        if start + t > self.capacity:
            # a quarter more (at least 256 slots): decoding past a long prompt must not double its memory
            self._grow(max(start + t, self.capacity + max(256, self.capacity // 4)))
        self.pos[:, :, start : start + t] = positions
        if self.bias is not None:
            self.bias[:, :, start : start + t] = 0.0
        self.length = start + t
        return start

    def add_bias(self, first_layer: int, slots: torch.Tensor, value: float) -> None:
        """Add ``value`` to the attention logits of the keys in ``slots`` [t] (all KV heads), in layers
        ``first_layer`` and after, for every later attention over this cache (prefill and decoding)."""
        if self.bias is None:
            self.bias = torch.zeros(self.layers, self.kv_heads, self.capacity)
        self.bias[first_layer:, :, slots] += value

    def copy_bias(self, n: int, capacity: int) -> torch.Tensor:
        """The bias of slots ``[0, n)`` in a new [L, KVH, capacity] tensor; the slots after them unbiased."""
        assert self.bias is not None and n <= capacity
        bias = torch.zeros(self.layers, self.kv_heads, capacity)
        bias[:, :, :n] = self.bias[:, :, :n]
        return bias

    def layer_bias(self, layer: int) -> torch.Tensor | None:
        """The logit bias of one layer's cached tokens, [KVH, n], or None if the cache has none."""
        return None if self.bias is None else self.bias[layer, :, : self.length]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [KVH, t, D]
        t = k.shape[1]
        self.k[layer, :, start : start + t] = k
        self.v[layer, :, start : start + t] = v

    def write_slots(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # slots: [t] int64 (any order); k, v: [KVH, t, D]
        self.k[layer][:, slots] = k
        self.v[layer][:, slots] = v

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k [KVH, n, D], v [KVH, n, D], pos [KVH, n]) views of one layer's cached tokens."""
        n = self.length
        return self.k[layer, :, :n], self.v[layer, :, :n], self.pos[layer, :, :n]

    @property
    def positions(self) -> torch.Tensor:
        """Positions of the cached tokens, [n]. Only defined while ``uniform``."""
        assert self.uniform, "positions differ per layer/head after eviction; use layer()"
        return self.pos[0, 0, : self.length]

    @property
    def keys(self) -> torch.Tensor:
        return self.k[:, :, : self.length]  # [L, KVH, n, D]

    @property
    def values(self) -> torch.Tensor:
        return self.v[:, :, : self.length]  # [L, KVH, n, D]

    @property
    def nbytes(self) -> int:
        """Bytes of the K/V of the cached tokens (what a dense cache of this length must hold)."""
        return 2 * self.keys.numel() * self.k.element_size()

    @property
    def reserved_nbytes(self) -> int:
        """Bytes this cache has allocated: K/V, positions and bias for its whole capacity."""
        held = 2 * self.k.numel() * self.k.element_size() + self.pos.numel() * self.pos.element_size()
        return held + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def bytes_per_slot(self) -> int:
        """Bytes one more slot takes (K/V of every layer and head, positions, bias)."""
        per = self.layers * self.kv_heads
        return per * (2 * self.head_dim * self.k.element_size() + 8 + (0 if self.bias is None else 4))

    def next_position(self) -> int:
        return int(self.pos[:, :, : self.length].max()) + 1 if self.length else 0

    def extend(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> int:
        """Append already computed K/V (e.g. a reused chunk): keys, values [L, KVH, t, D], positions [t]."""
        start = self.append(positions)
        t = positions.shape[0]
        self.k[:, :, start : start + t] = keys
        self.v[:, :, start : start + t] = values
        return start

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only the given slots, in order: slots [L, KVH, m] int64 (per layer and head) or [m] (shared)."""
        n = self.length
        if slots.dim() == 1:
            slots = slots.expand(self.layers, self.kv_heads, -1)
        else:
            self.uniform = self.uniform and bool((slots == slots[:1, :1]).all())
        m = slots.shape[-1]
        idx = slots[..., None].expand(-1, -1, -1, self.head_dim)
        self.k[:, :, :m] = torch.gather(self.k[:, :, :n], 2, idx)
        self.v[:, :, :m] = torch.gather(self.v[:, :, :n], 2, idx)
        self.pos[:, :, :m] = torch.gather(self.pos[:, :, :n], 2, slots)
        if self.bias is not None:
            self.bias[:, :, :m] = torch.gather(self.bias[:, :, :n], 2, slots)
        self.length = m

    @property
    def tail_room(self) -> int | None:
        """How many of the newest tokens :meth:`keep_tail` can drop (None: any number)."""
        return None

    def keep_tail(self, start: int, slots: list[int]) -> None:
        """Keep slots ``[0, start)`` and, after them, the given ``slots`` (>= ``start``, ascending); drop the rest
        (a speculative step's rejected rows). Moves nothing when ``slots`` already follow ``start`` in order."""
        n = len(slots)
        if slots != list(range(start, start + n)):
            idx = torch.tensor(slots)
            self.k[:, :, start : start + n] = self.k[:, :, idx]
            self.v[:, :, start : start + n] = self.v[:, :, idx]
            self.pos[:, :, start : start + n] = self.pos[:, :, idx]
            if self.bias is not None:
                self.bias[:, :, start : start + n] = self.bias[:, :, idx]
        self.length = start + n

    def clone(self, upto: int | None = None) -> KVCache:
        """An independent copy of slots ``[0, upto)`` (default: all), capacity trimmed to that length."""
        n = self.length if upto is None else min(upto, self.length)
        c = KVCache(self.layers, self.kv_heads, self.head_dim, self.dtype, capacity=max(1, n))
        c.k[:, :, :n], c.v[:, :, :n], c.pos[:, :, :n] = self.k[:, :, :n], self.v[:, :, :n], self.pos[:, :, :n]
        c.length, c.uniform = n, self.uniform
        if self.bias is not None:
            c.bias = self.copy_bias(n, c.capacity)
        return c

    def truncate(self, length: int) -> None:
        """Drop every slot from ``length`` on (used to roll back to a shared prefix)."""
        assert 0 <= length <= self.length
        self.length = length
