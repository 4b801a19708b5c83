"""QuantizedKVCache: the decode cache with ``--kv-bits``, KIVI-packed K/V that ``Runner.forward`` reads as usual.

Each layer's tokens live in a :class:`~kvstash.quant_cache.QuantizedLayerCache`: keys per channel and values
per token in groups of G, the newest R tokens and the first token (an attention sink) in fp16 (the precision
the byte counts are measured against); with ``--kv-alloc mixed`` each KV head may have its own widths (a
:class:`~kvstash.quant_cache.HeadwiseLayerCache`). Decoding appends to that residual and quantizes whole
groups as they fill.

Attention needs dense K/V. This engine has no fused dequantize-and-attend kernel, so the cache also keeps a
*working copy* in the compute dtype (the base class's buffers) equal to the dequantized packed data; a slot of
it changes only when its token is written or its group is quantized, so no step dequantizes the whole cache.
``nbytes`` reports the packed bytes, what a fused kernel would hold; ``working_nbytes`` the copy.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from kvstash.cache.kv import KVCache
from kvstash.cache.layer import HeadwiseLayerCache, KVQuantConfig, QuantizedLayerCache


class QuantizedKVCache(KVCache):
    """Append-only KVCache whose K/V are held KIVI-quantized (see the module docstring).

    Slot ``i`` of a layer is token ``i`` of its :class:`QuantizedLayerCache`. Eviction (``keep``), rollback
    (``truncate``) and rewriting slots are refused: evict before quantizing.
    """

    def __init__(self, layers, kv_heads, head_dim, dtype, config: KVQuantConfig, capacity: int = 256, head_bits=None):
        super().__init__(layers, kv_heads, head_dim, dtype, capacity)
        self.config = config
        if head_bits is None:
            head_bits = torch.tensor([config.key_bits, config.value_bits]).expand(layers, kv_heads, 2)
        head_bits = torch.as_tensor(head_bits, dtype=torch.long)
        if head_bits.shape != (layers, kv_heads, 2):
            raise ValueError(
                f"head_bits must be [layers, kv_heads, 2] = [{layers}, {kv_heads}, 2] (key, value bits per KV head), "
                f"got {list(head_bits.shape)}"
            )
        self.head_bits = head_bits.clone()  # [L, KVH, 2]
        self.stores = [self._layer_store(b) for b in self.head_bits]  # the packed K/V, one per layer

    def _layer_store(self, bits: torch.Tensor):
        """bits [KVH, 2] -> one QuantizedLayerCache when every head has the same widths, else one per head."""
        widths = [replace(self.config, key_bits=int(kb), value_bits=int(vb)) for kb, vb in bits]
        return QuantizedLayerCache(widths[0]) if len(set(widths)) == 1 else HeadwiseLayerCache(widths)

    @classmethod
    def from_cache(cls, cache: KVCache, config: KVQuantConfig, extra: int = 64, head_bits=None) -> QuantizedKVCache:
        """Quantize a prefilled cache (after any eviction; per-head positions are kept). ``extra``: slots
        reserved for decoding; ``head_bits`` [layers, kv_heads, 2]: (key, value) bits per KV head (None:
        ``config``'s everywhere). ``cache`` is left as it was."""
        n = cache.length
        q = cls(cache.layers, cache.kv_heads, cache.head_dim, cache.dtype, config, n + extra, head_bits)
        q.pos[:, :, :n] = cache.pos[:, :, :n]
        q.length, q.uniform = n, cache.uniform
        if cache.bias is not None:  # blend's logit bias on stale keys carries over to decoding
            q.bias = cache.copy_bias(n, q.capacity)
        for i, store in enumerate(q.stores):
            k, v, _ = cache.layer(i)
            store.append(k.half(), v.half())
            q.k[i, :, :n], q.v[i, :, :n] = store.materialize()
        return q

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [KVH, t, D]
        store = self.stores[layer]
        if start != store.num_tokens:
            raise ValueError(
                f"a quantized cache is append-only: layer {layer} holds {store.num_tokens} tokens, "
                f"got a write at slot {start}"
            )
        k16, v16 = k.half(), v.half()
        quantized = store.append(k16, v16)
        super().write(layer, start, k16, v16)  # what the residual holds, in the compute dtype
        if quantized:  # a group just got quantized: its slots now read the dequantized values
            first = store.num_sinks + store.num_quantized - quantized
            qk, qv = store.last_block()
            super().write(layer, first, qk, qv)

    def extend(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> int:
        start = self.append(positions)
        for i in range(self.layers):
            self.write(i, start, keys[i], values[i])
        return start

    def clone(self) -> QuantizedKVCache:
        """An independent copy, packed stores included."""
        return copy.deepcopy(self)

    def write_slots(self, layer, slots, k, v) -> None:
        raise ValueError("a quantized cache is append-only; rewrite slots before quantizing")

    def keep(self, slots: torch.Tensor) -> None:
        raise ValueError("a quantized cache cannot evict; evict first, then quantize")

    def truncate(self, length: int) -> None:
        raise ValueError("a quantized cache cannot be rolled back")

    @property
    def tail_room(self) -> int:
        """How many of the newest tokens :meth:`keep_tail` can still drop: those in the fp16 residual."""
        return self.config.residual

    def keep_tail(self, start: int, slots: list[int]) -> None:
        """As :meth:`KVCache.keep_tail`, for rows appended in the last pass while they are in the residual."""
        offsets = [s - start for s in slots]
        for store in self.stores:
            store.keep_recent(self.length - start, offsets)
        super().keep_tail(start, slots)

    @property
    def nbytes(self) -> int:
        """Bytes of K/V actually held: packed codes, fp16 scales and zeros, the fp16 residual."""
        return sum(s.nbytes for s in self.stores)

    @property
    def reserved_nbytes(self) -> int:
        """The dense working copy's buffers plus the packed data."""
        return super().reserved_nbytes + self.nbytes

    @property
    def working_nbytes(self) -> int:
        """Bytes of the dense working copy attention reads (see the module docstring)."""
        return super().nbytes

    def check_integrity(self) -> None:
        """RuntimeError with the numbers if a layer's packed tokens and the slots disagree."""
        counts = [s.num_tokens for s in self.stores]
        if any(c != self.length for c in counts):
            raise RuntimeError(f"quantized cache holds {self.length} slots but its layers hold {counts} tokens")


def quantize_cache(cache: KVCache, bits: int, head_bits=None) -> QuantizedKVCache:
    """``cache`` (prefilled, possibly evicted) as a decode cache at ``bits`` (2, 4, 8 or 16 = fp16) with
    :meth:`KVQuantConfig.for_bits` defaults; ``head_bits`` [layers, kv_heads, 2] (from
    :func:`kvstash.kv_alloc.allocate_head_bits`) sets each KV head's key and value bits instead. ValueError for
    other bits."""
    return QuantizedKVCache.from_cache(cache, KVQuantConfig.for_bits(bits), head_bits=head_bits)
