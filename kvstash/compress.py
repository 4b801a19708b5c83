"""Compression of the decode cache after prefill: evict first (:mod:`kvstash.evict`), then quantize
(:mod:`kvstash.kv_quant`), uniformly or with per-KV-head widths (:mod:`kvstash.kv_alloc`). What ``--evict``,
``--kv-bits`` and ``--kv-alloc`` (``evict=``, ``kv_bits=``, ``kv_alloc=``) turn into."""

from __future__ import annotations

from dataclasses import dataclass

from kvstash.evict import DecodeEvictor, EvictionPolicy, parse_evict, start_eviction
from kvstash.forward import Runner
from kvstash.kv_alloc import KV_ALLOCS, STEPS, allocate_head_bits
from kvstash.kv_quant import quantize_cache
from kvstash.quant_cache import KV_BITS
from kvstash.reuse import Prefilled


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

    def apply(self, runner: Runner, pre: Prefilled, token_ids) -> DecodeEvictor | None:
        """Compress ``pre.cache`` (replaced by a quantized cache when ``kv_bits``). Returns the evictor to run
        while decoding, if the policy evicts then too. A mixed allocation is measured before eviction, on the
        cache as prefilled, and recorded in ``pre.report.kv_head_bits``."""
        head_bits = None
        if self.kv_alloc == "mixed":
            head_bits = allocate_head_bits(runner, pre.cache, token_ids, self.kv_bits)
            pre.report.kv_head_bits = head_bits.tolist()
        evictor = start_eviction(self.evict, runner, pre.cache, token_ids) if self.evict else None
        if self.kv_bits is not None:
            pre.cache = quantize_cache(pre.cache, self.kv_bits, head_bits)
        return evictor
