"""Compression of the decode cache after prefill: evict first (:mod:`kvstash.evict`), then quantize
(:mod:`kvstash.kv_quant`), uniformly or with per-KV-head widths (:mod:`kvstash.kv_alloc`). What ``--evict``,
``--kv-bits`` and ``--kv-alloc`` (``evict=``, ``kv_bits=``, ``kv_alloc=``) turn into."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from kvstash.cache.kv import KVCache
from kvstash.cache.layer import KV_BITS
from kvstash.cache.quantized import quantize_cache
from kvstash.compress.bits import KV_ALLOCS, STEPS, allocate_head_bits
from kvstash.compress.evict import DecodeEvictor, EvictionPolicy, parse_evict, start_eviction
from kvstash.model.runner import Runner


class Compressed(NamedTuple):
    cache: KVCache  # the prompt's cache after eviction and quantization (a new object when quantized)
    evictor: DecodeEvictor | None  # to run while decoding, when the policy evicts then too
    head_bits: list | None  # [layer][kv head] = [key bits, value bits] with a mixed allocation


@dataclass(frozen=True)
class Compression:
    evict: EvictionPolicy | None = None  # applied to the prompt's cache right after prefill
    kv_bits: int | None = None  # 2, 4, 8, or 16 (fp16); None: the cache stays in the compute dtype
    kv_alloc: str = "uniform"  # uniform | mixed (per-KV-head key/value widths around 4 bits, same bytes)

    @classmethod
    def parse(
        cls, kv_bits: int | None = None, evict: str | EvictionPolicy | None = None, kv_alloc: str | None = None
    ) -> Compression:
        """Validate user input once: ValueError for unknown bits or allocation, a bad ``--evict`` spec,
        eviction while decoding together with quantization (a quantized cache is append-only), or a mixed
        allocation at other than 4 bits."""
        if kv_bits is not None and kv_bits not in KV_BITS:
            raise ValueError(f"--kv-bits must be one of {', '.join(map(str, KV_BITS))} (16 = fp16), got {kv_bits!r}")
        kv_alloc = kv_alloc or "uniform"
        if kv_alloc not in KV_ALLOCS:
            raise ValueError(f"--kv-alloc must be one of {', '.join(KV_ALLOCS)}, got {kv_alloc!r}")
        if kv_alloc == "mixed" and kv_bits not in STEPS:
            raise ValueError(
                "--kv-alloc mixed trades 2- and 8-bit tensors around 4 bits: use it with --kv-bits 4 "
                + (f"(got {kv_bits})" if kv_bits is not None else "(--kv-bits was not given)")
            )
        policy = parse_evict(evict) if isinstance(evict, str) else evict
        if policy is not None and policy.decode and kv_bits is not None:
            raise ValueError("eviction while decoding (':decode') cannot be combined with --kv-bits; drop one")
        return cls(policy, kv_bits, kv_alloc)

    def apply(self, runner: Runner, cache: KVCache, token_ids) -> Compressed:
        """Compress the prompt's ``cache`` (right after prefill): a mixed allocation is measured first, on the
        cache as prefilled; then eviction (changes ``cache``), then quantization (a new cache)."""
        head_bits = None
        if self.kv_alloc == "mixed":
            head_bits = allocate_head_bits(runner, cache, token_ids, self.kv_bits)
        evictor = start_eviction(self.evict, runner, cache, token_ids) if self.evict else None
        if self.kv_bits is not None:
            cache = quantize_cache(cache, self.kv_bits, head_bits)
        return Compressed(cache, evictor, None if head_bits is None else head_bits.tolist())
