"""What ``kvstash bench --methods`` accepts: one comma-separated spec per method, parsed into `MethodSpec`.

Grammar (each spec): ``NAME[:RATIO][+CODEC][+spec][@kvBITS][@POLICY:BUDGET]``

- ``NAME``: a reuse method (``full``, ``prefix``, ``naive``, ``blend``, ``blend:0.3``, ``cacheblend:0.15``)
  or a transformers baseline (``hf``: plain ``generate`` on the same prompt ids; ``hf-prefix``: ``generate``
  continuing a cached copy of the shared prompt head).
- ``+CODEC``: how chunk KV is encoded in the store (``fp16``, ``kivi4``, ...), e.g. ``blend:0.15+kivi4``.
- ``+spec``: speculative decoding (n-gram drafts from the prompt, verified as a token tree), e.g. ``blend:0.15+spec``;
  ``hf-lookup`` is transformers' prompt-lookup decoding on the same prompt ids, its peer.
- ``@kvBITS``: quantize the working KV cache to BITS bits, e.g. ``full@kv4`` (passed as ``kv_bits=``);
  ``@kv4mixed``: 4 bits on average, each KV head's keys and values at 2, 4 or 8 by sensitivity (``kv_alloc=``).
- ``@POLICY:BUDGET``: evict prompt KV with a policy, e.g. ``full@snapkv:0.25`` (passed as ``evict=``).

The compression fields are handed to the engine only when set, so plain specs work on any engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvstash.reuse import make_method
from kvstash.store.codec_registry import get_codec

BASELINES = ("hf", "hf-prefix", "hf-lookup")  # measured with transformers, not the kvstash engine
DEFAULT_METHODS = "full,prefix,naive,cacheblend:0.15,blend:0.15,blend:0.3,hf,hf-prefix"
QUICK_METHODS = "full,naive,blend:0.15,hf"
_KV_BITS = re.compile(r"kv(\d+)(mixed)?")


@dataclass(frozen=True)
class MethodSpec:
    """One method of a benchmark run, validated once."""

    name: str  # as shown in tables: the spec the user typed
    reuse: str  # reuse method spec for the engine (``blend:0.15``) or a baseline name (``hf``)
    codec: str | None = None  # chunk store codec for this method's store (None: the engine's default)
    kv_bits: int | None = None  # working-cache quantization bits (None: off)
    evict: str | None = None  # eviction policy spec, e.g. ``snapkv:0.25`` (None: off)
    kv_alloc: str | None = None  # "mixed": per-KV-head widths around kv_bits (None: uniform)
    speculate: bool = False  # speculative decoding (``+spec``)

    def __post_init__(self) -> None:
        if self.is_baseline:
            if self.codec or self.kv_bits or self.evict or self.speculate:
                raise ValueError(f"{self.name}: the transformers baselines take no + or @ options")
            return
        make_method(self.reuse)  # raises ValueError naming the known methods
        if self.codec is not None:
            get_codec(self.codec)  # raises ValueError naming the known codecs
        if self.kv_bits is not None and not 1 <= self.kv_bits <= 16:
            raise ValueError(f"{self.name}: @kvBITS takes 1..16 bits, got {self.kv_bits}")
        if self.kv_alloc is not None and self.kv_bits != 4:
            raise ValueError(f"{self.name}: a mixed allocation trades widths around 4 bits: use @kv4mixed")

    @property
    def is_baseline(self) -> bool:
        return self.reuse in BASELINES

    @property
    def base(self) -> str:
        """The reuse method's name without its ratio: full | prefix | naive | blend | cacheblend | hf | hf-prefix."""
        return self.reuse.partition(":")[0]

    @property
    def engine_kwargs(self) -> dict:
        """Compression keyword arguments for ``Engine.generate``/``prefill``: only the ones that are set."""
        kw = {"kv_bits": self.kv_bits, "evict": self.evict, "kv_alloc": self.kv_alloc}
        return {k: v for k, v in kw.items() if v is not None}

    @property
    def plain(self) -> str:
        """The name of the same method without speculation (what ``+spec`` answers are compared with)."""
        return self.name.replace("+spec", "")

    @property
    def is_reference(self) -> bool:
        """Plain full prefill: the reference every other method is compared with."""
        return self.reuse == "full" and not (self.codec or self.kv_bits or self.evict or self.speculate)


def parse_method(spec: str) -> MethodSpec:
    """One spec (see the module docstring) -> MethodSpec. ValueError says what is wrong and what is allowed."""
    text = spec.strip()
    if not text:
        raise ValueError("empty method spec; e.g. --methods full,naive,blend:0.15")
    head, *mods = text.split("@")
    reuse, *pluses = head.split("+")
    speculate = "spec" in pluses
    codecs = [p for p in pluses if p != "spec"]
    if len(codecs) > 1:
        raise ValueError(f"{text}: one codec at most, e.g. blend+kivi4+spec")
    codec = codecs[0] if codecs else ("" if "" in pluses else None)
    kv_bits = evict = kv_alloc = None
    for mod in mods:
        if m := _KV_BITS.fullmatch(mod):
            kv_bits, kv_alloc = int(m.group(1)), m.group(2)
        elif ":" in mod:  # the engine validates the policy (snapkv:0.25, h2o:512, streaming:0.25:decode)
            evict = mod
        else:
            raise ValueError(f"{text}: unknown modifier @{mod}; use @kvBITS (e.g. @kv4, @kv4mixed) or @POLICY:BUDGET")
    if codec == "":
        raise ValueError(f"{text}: '+' must be followed by a codec or 'spec', e.g. blend+kivi4")
    return MethodSpec(text, reuse, codec or None, kv_bits, evict, kv_alloc, speculate)


def parse_methods(specs: str) -> tuple[MethodSpec, ...]:
    """A comma-separated list of specs, with plain ``full`` put first (added if missing): it is the
    reference for speedup, agreement and KL. Duplicate names are a ValueError."""
    methods = [parse_method(s) for s in specs.split(",") if s.strip()]
    if not methods:
        raise ValueError("no methods given; e.g. --methods full,naive,blend:0.15")
    names = [m.name for m in methods]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"method(s) listed twice: {', '.join(dupes)}")
    ref = [m for m in methods if m.is_reference] or [MethodSpec("full", "full")]
    return (ref[0], *[m for m in methods if not m.is_reference])
