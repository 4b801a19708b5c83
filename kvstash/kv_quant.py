"""QuantizedKVCache: the decode cache with ``--kv-bits``, KIVI-packed K/V that ``Runner.forward`` reads as usual.

Each layer's tokens live in a :class:`~kvstash.quant_cache.QuantizedLayerCache`: keys per channel and values
per token in groups of G, the newest R tokens and the first token (an attention sink) in fp16 (the precision
the byte counts are measured against).
Decoding appends to that residual and quantizes whole groups as they fill.

Attention needs dense K/V. This engine has no fused dequantize-and-attend kernel, so the cache also keeps a
*working copy* in the compute dtype (the base class's buffers) equal to the dequantized packed data; a slot of
it changes only when its token is written or its group is quantized, so no step dequantizes the whole cache.
``nbytes`` reports the packed bytes, what a fused kernel would hold; ``working_nbytes`` the copy.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from kvstash.kv import KVCache
from kvstash.quant_cache import KVQuantConfig, QuantizedLayerCache


class QuantizedKVCache(KVCache):
    """Append-only KVCache whose K/V are held KIVI-quantized (see the module docstring).

    Slot ``i`` of a layer is token ``i`` of its :class:`QuantizedLayerCache`. Eviction (``keep``), rollback
    (``truncate``) and rewriting slots are refused: evict before quantizing.
    """

    def __init__(self, layers, kv_heads, head_dim, dtype, config: KVQuantConfig, capacity: int = 256, layer_bits=None):
        super().__init__(layers, kv_heads, head_dim, dtype, capacity)
        self.config = config
        if layer_bits is not None and len(layer_bits) != layers:
            raise ValueError(
                f"layer_bits needs one (key_bits, value_bits) pair per layer ({layers}), got {len(layer_bits)}"
            )
        self.layer_bits = [(config.key_bits, config.value_bits)] * layers if layer_bits is None else [
            (int(kb), int(vb)) for kb, vb in layer_bits
        ]  # fmt: skip
        self.stores = [  # the packed K/V, one per layer
            QuantizedLayerCache(replace(config, key_bits=kb, value_bits=vb)) for kb, vb in self.layer_bits
        ]

    @classmethod
    def from_cache(cls, cache: KVCache, config: KVQuantConfig, extra: int = 64, layer_bits=None) -> QuantizedKVCache:
        """Quantize a prefilled cache (after any eviction; per-head positions are kept). ``extra``: slots
        reserved for decoding; ``layer_bits``: (key_bits, value_bits) per layer (None: ``config``'s for all).
        ``cache`` is left as it was."""
        n = cache.length
        q = cls(cache.layers, cache.kv_heads, cache.head_dim, cache.dtype, config, n + extra, layer_bits)
        q.pos[:, :, :n] = cache.pos[:, :, :n]
        q.length, q.uniform = n, cache.uniform
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
    def nbytes(self) -> int:
        """Bytes of K/V actually held: packed codes, fp16 scales and zeros, the fp16 residual."""
        return sum(s.nbytes for s in self.stores)

    @property
    def working_nbytes(self) -> int:
        """Bytes of the dense working copy attention reads (see the module docstring)."""
        return super().nbytes

    def check_integrity(self) -> None:
        """RuntimeError with the numbers if a layer's packed tokens and the slots disagree."""
        counts = [s.num_tokens for s in self.stores]
        if any(c != self.length for c in counts):
            raise RuntimeError(f"quantized cache holds {self.length} slots but its layers hold {counts} tokens")


def quantize_cache(cache: KVCache, bits: int, layer_bits=None) -> QuantizedKVCache:
    """``cache`` (prefilled, possibly evicted) as a decode cache at ``bits`` (2, 4, 8 or 16 = fp16) with
    :meth:`KVQuantConfig.for_bits` defaults; ``layer_bits`` (from :func:`kvstash.kv_alloc.allocate_layer_bits`)
    sets each layer's (key_bits, value_bits) instead. ValueError for other bits."""
    return QuantizedKVCache.from_cache(cache, KVQuantConfig.for_bits(bits), layer_bits=layer_bits)
