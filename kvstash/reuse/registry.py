"""The reuse methods by the name a user types (``--reuse``, ``reuse=``), filled here explicitly."""

from __future__ import annotations

from kvstash.reuse.base import ReuseMethod
from kvstash.reuse.blend import AUTO_DEVIATION, AUTO_MAX, BlendConfig, BlendReuse, CacheBlendReuse
from kvstash.reuse.full import FullPrefill
from kvstash.reuse.partial import NaiveReuse
from kvstash.reuse.prefix import PrefixReuse

REUSE_METHODS: dict[str, type[ReuseMethod]] = {
    cls.name: cls for cls in (FullPrefill, PrefixReuse, NaiveReuse, BlendReuse, CacheBlendReuse)
}
BLEND_METHODS = ("blend", "cacheblend")  # the ones that take a ratio and BlendConfig options


def make_method(spec: str, prefill_chunk: int = 512, **opts) -> ReuseMethod:
    """Build a method from what a user types: ``full``, ``prefix``, ``naive``, ``blend``, ``blend:0.3``,
    ``blend:auto`` (the ratio chosen per prompt from the deviation at the check layer, up to 0.3 or ``ratio``),
    ``cacheblend`` or ``cacheblend:0.3``.

    ``opts`` are :class:`BlendConfig` fields (ratio, check_layer, query_share, stale_bias, gate); None values are
    ignored. ValueError names what is known when the spec or an option is wrong.
    """
    name, _, arg = str(spec).partition(":")
    if name not in REUSE_METHODS:
        raise ValueError(f"unknown reuse method {spec!r}; choose one of: {', '.join(REUSE_METHODS)} (blend:RATIO)")
    opts = {k: v for k, v in opts.items() if v is not None}
    if arg:
        if name not in BLEND_METHODS:
            raise ValueError(f"only blend and cacheblend take a ratio (blend:0.15), got {spec!r}")
        if arg == "auto":
            return _auto(name, prefill_chunk, opts)
        try:
            opts["ratio"] = float(arg)
        except ValueError:
            raise ValueError(f"blend ratio must be a number, e.g. blend:0.15; got {arg!r}") from None
    if name == "cacheblend" and (opts.get("query_share") or opts.get("stale_bias") or opts.get("spans")):
        raise ValueError(
            "cacheblend is plain CacheBlend (no question share, no stale bias, no spans); use blend with "
            "--query-share, --stale-bias or --spans"
        )
    cls = REUSE_METHODS[name]
    if name in BLEND_METHODS:
        return cls(BlendConfig(**opts), prefill_chunk=prefill_chunk)
    if opts:
        raise ValueError(f"{name} takes no blend options (got {', '.join(sorted(opts))}); use blend or cacheblend")
    return cls(prefill_chunk=prefill_chunk)


def _auto(name: str, prefill_chunk: int, opts: dict) -> ReuseMethod:
    opts = {"auto": AUTO_DEVIATION, "ratio": AUTO_MAX, **opts}
    return make_method(name, prefill_chunk, **opts)


def register_method(cls: type[ReuseMethod]) -> type[ReuseMethod]:
    """Add a reuse method of your own under ``cls.name`` (usable as a decorator)."""
    REUSE_METHODS[cls.name] = cls
    return cls
