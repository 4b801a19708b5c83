"""Content-addressed chunk KV store: tiers in RAM, on disk, in Redis and in a Redis Cluster."""

from kvstash.store.base import Hit, StoreConfig, Tier, TierStats, VerifyResult
from kvstash.store.chunk import ChunkKV
from kvstash.store.cluster_tier import RedisClusterTier
from kvstash.store.codec import Codec
from kvstash.store.codec_registry import CODECS, get_codec, register_codec
from kvstash.store.disk import DiskTier
from kvstash.store.prefetch import Prefetcher
from kvstash.store.ram import DEFAULT_RAM_BUDGET, RamTier
from kvstash.store.record import (
    FORMAT_VERSION,
    CorruptRecord,
    Record,
    chunk_key,
    decode_record,
    encode_record,
)
from kvstash.store.redis_tier import RedisTier
from kvstash.store.scan import CodecUsage
from kvstash.store.spec import SPEC_SYNTAX, TierSpec, open_store, parse_size, parse_spec
from kvstash.store.tiered import TieredStore

__all__ = [
    "DEFAULT_RAM_BUDGET",
    "FORMAT_VERSION",
    "SPEC_SYNTAX",
    "CODECS",
    "Codec",
    "CodecUsage",
    "ChunkKV",
    "CorruptRecord",
    "DiskTier",
    "Hit",
    "Prefetcher",
    "RamTier",
    "Record",
    "RedisClusterTier",
    "RedisTier",
    "StoreConfig",
    "Tier",
    "TierSpec",
    "TierStats",
    "TieredStore",
    "VerifyResult",
    "chunk_key",
    "decode_record",
    "encode_record",
    "get_codec",
    "open_store",
    "parse_size",
    "parse_spec",
    "register_codec",
]
