"""Reuse methods: how a prompt's KV is built from the chunk store (full, prefix, naive, blend, cacheblend)."""

from kvstash.reuse.base import Prefilled, ReuseMethod
from kvstash.reuse.blend import BlendConfig
from kvstash.reuse.registry import REUSE_METHODS, make_method, register_method
from kvstash.reuse.report import PrefillReport, SegmentReport
from kvstash.reuse.source import DEFAULT_STORE, ChunkSource

__all__ = [
    "DEFAULT_STORE",
    "REUSE_METHODS",
    "BlendConfig",
    "ChunkSource",
    "PrefillReport",
    "Prefilled",
    "ReuseMethod",
    "SegmentReport",
    "make_method",
    "register_method",
]
