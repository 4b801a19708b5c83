"""Compression of the decode cache after prefill: evict first (:mod:`kvstash.evict`), then quantize
(:mod:`kvstash.kv_quant`). What ``--evict`` and ``--kv-bits`` (``evict=``, ``kv_bits=``) turn into."""

from __future__ import annotations

from dataclasses import dataclass

from kvstash.evict import DecodeEvictor, EvictionPolicy, parse_evict, start_eviction
from kvstash.forward import Runner
from kvstash.kv_quant import quantize_cache
from kvstash.quant_cache import KV_BITS
from kvstash.reuse import Prefilled


@dataclass(frozen=True)
class Compression:
    evict: EvictionPolicy | None = None  # applied to the prompt's cache right after prefill
    kv_bits: int | None = None  # 2, 4, 8, or 16 (fp16); None: the cache stays in the compute dtype

    @classmethod
    def parse(cls, kv_bits: int | None = None, evict: str | EvictionPolicy | None = None) -> Compression:
        """Validate user input once: ValueError for unknown bits, a bad ``--evict`` spec, or eviction while
        decoding together with quantization (a quantized cache is append-only)."""
        if kv_bits is not None and kv_bits not in KV_BITS:
            raise ValueError(f"--kv-bits must be one of {', '.join(map(str, KV_BITS))} (16 = fp16), got {kv_bits!r}")
        policy = parse_evict(evict) if isinstance(evict, str) else evict
        if policy is not None and policy.decode and kv_bits is not None:
            raise ValueError("eviction while decoding (':decode') cannot be combined with --kv-bits; drop one")
        return cls(policy, kv_bits)

    def apply(self, runner: Runner, pre: Prefilled, token_ids) -> DecodeEvictor | None:
        """Compress ``pre.cache`` (replaced by a quantized cache when ``kv_bits``). Returns the evictor to run
        while decoding, if the policy evicts then too."""
        evictor = start_eviction(self.evict, runner, pre.cache, token_ids) if self.evict else None
        if self.kv_bits is not None:
            pre.cache = quantize_cache(pre.cache, self.kv_bits)
        return evictor
