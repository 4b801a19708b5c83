"""Store specs: the one-line string a user types (``ram:4GiB,disk:~/.cache/kvstash/kv:50GiB``) -> a store."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kvstash.store.base import StoreConfig, Tier
from kvstash.store.cluster_tier import RedisClusterTier
from kvstash.store.disk import DiskTier
from kvstash.store.ram import DEFAULT_RAM_BUDGET, RamTier
from kvstash.store.redis_client import CLUSTER_SCHEME, cluster_nodes
from kvstash.store.redis_tier import DEFAULT_PREFIX, RedisTier
from kvstash.store.tiered import TieredStore

SPEC_SYNTAX = """a store spec is a comma-separated list of tiers, fastest first:
  ram[:SIZE]                          process memory, LRU within SIZE (default 2GiB)
  disk:PATH[:SIZE]                    one file per chunk under PATH, LRU within SIZE (default unbounded)
  redis://HOST:PORT/DB[?ttl=SECONDS]  a Redis server (also rediss://, unix://; optional &prefix=P)
  redis+cluster://HOST:PORT[,HOST:PORT...][?ttl=SECONDS&prefix=P]  a Redis Cluster (any of its nodes)
SIZE is plain bytes or a number with KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024),
e.g. ram:4GiB,disk:~/.cache/kvstash/kv:50GiB,redis://127.0.0.1:6379/0?ttl=3600"""

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_NODE_RE = re.compile(r"(?!(?:ram|disk):)[^:/?,\s]+:\d+(?:\?.*)?|\[[0-9a-fA-F:]+\]:\d+(?:\?.*)?")


class TierSpec(NamedTuple):
    """One parsed tier: ``kind`` is ram, disk, redis or redis-cluster; the other fields apply to some kinds."""

    kind: str
    budget_bytes: int | None = None  # ram, disk
    path: str | None = None  # disk: directory, ~ expanded
    url: str | None = None  # redis, redis-cluster: URL without kvstash's own query options
    ttl_seconds: int | None = None  # redis, redis-cluster
    prefix: str = DEFAULT_PREFIX  # redis, redis-cluster


def parse_size(text: str) -> int:
    """``4GiB`` -> 4294967296, ``500MB`` -> 500000000, ``1024`` -> 1024. ValueError if unreadable."""
    m = _SIZE_RE.fullmatch(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or int(float(m.group(1)) * _UNITS[unit]) <= 0:
        raise ValueError(f"bad size {text!r}: use a positive number of bytes or e.g. 512MiB, 4GiB, 50GB")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_spec(spec: str) -> list[TierSpec]:
    """Parse a store spec (see SPEC_SYNTAX) without opening anything. ValueError on a bad spec."""
    parts = _split_tiers(spec) if spec and spec.strip() else []
    if not parts or not all(parts):
        raise ValueError(f"empty tier in store spec {spec!r}\n{SPEC_SYNTAX}")
    tiers = [_parse_tier(p, spec) for p in parts]
    kinds = [t.kind for t in tiers]
    for kind in set(kinds):
        if kinds.count(kind) > 1 and kind != "disk":
            raise ValueError(f"store spec {spec!r} names {kind} more than once\n{SPEC_SYNTAX}")
    return tiers


def open_store(spec: str, config: StoreConfig) -> TieredStore:
    """Build the :class:`TieredStore` a spec describes. Creates disk directories; does not contact Redis
    (an unreachable server only shows up as misses and ``errors``). ValueError on a bad spec."""
    tiers: list[Tier] = []
    for t in parse_spec(spec):
        if t.kind == "ram":
            tiers.append(RamTier(config, t.budget_bytes or DEFAULT_RAM_BUDGET))
        elif t.kind == "disk":
            tiers.append(DiskTier(config, t.path, t.budget_bytes))
        elif t.kind == "redis-cluster":
            tiers.append(RedisClusterTier(config, t.url, ttl_seconds=t.ttl_seconds, prefix=t.prefix))
        else:
            tiers.append(RedisTier(config, t.url, ttl_seconds=t.ttl_seconds, prefix=t.prefix))
    return TieredStore(tiers)


def _split_tiers(spec: str) -> list[str]:
    """Split at commas, keeping a cluster's node list (``redis+cluster://a:1,b:2``) in one part: a
    ``HOST:PORT`` after a cluster part is one of its nodes (a host named ram or disk is not)."""
    parts: list[str] = []
    for raw in spec.split(","):
        part = raw.strip()
        prev = parts[-1] if parts else ""
        if prev.startswith(CLUSTER_SCHEME) and "?" not in prev and _NODE_RE.fullmatch(part):
            parts[-1] = prev + "," + part
        else:
            parts.append(part)
    return parts


def _parse_tier(part: str, spec: str) -> TierSpec:
    try:
        if part.startswith(CLUSTER_SCHEME):
            return _parse_cluster(part)
        if part.startswith(_REDIS_SCHEMES):
            return _parse_redis(part)
        kind, _, rest = part.partition(":")
        if kind == "ram":
            return TierSpec("ram", budget_bytes=parse_size(rest) if rest else DEFAULT_RAM_BUDGET)
        if kind == "disk" and rest:
            path, budget = rest, None
            head, sep, tail = rest.rpartition(":")
            if sep and head and _SIZE_RE.fullmatch(tail):
                path, budget = head, parse_size(tail)
            return TierSpec("disk", budget_bytes=budget, path=str(Path(path).expanduser()))
    except ValueError as e:
        raise ValueError(f"bad tier {part!r} in store spec {spec!r}: {e}\n{SPEC_SYNTAX}") from e
    raise ValueError(f"bad tier {part!r} in store spec {spec!r}\n{SPEC_SYNTAX}")


def _parse_redis(part: str) -> TierSpec:
    url = urlsplit(part)
    query = dict(parse_qsl(url.query, keep_blank_values=True))
    ttl, prefix = _kvstash_options(query)
    if url.scheme != "unix" and not url.hostname:
        raise ValueError("the redis URL has no host")
    clean = urlunsplit(url._replace(query=urlencode(query)))
    return TierSpec("redis", url=clean, ttl_seconds=ttl, prefix=prefix)


def _parse_cluster(part: str) -> TierSpec:
    nodes_part, _, query_text = part.partition("?")
    query = dict(parse_qsl(query_text, keep_blank_values=True))
    ttl, prefix = _kvstash_options(query)
    if query:
        raise ValueError(f"unknown cluster option(s) {', '.join(sorted(query))}; use ttl= and prefix=")
    nodes = cluster_nodes(nodes_part)  # ValueError naming the bad node
    url = CLUSTER_SCHEME + ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in nodes)
    return TierSpec("redis-cluster", url=url, ttl_seconds=ttl, prefix=prefix)


def _kvstash_options(query: dict[str, str]) -> tuple[int | None, str]:
    """Take kvstash's own options (ttl, prefix) out of a Redis URL's query."""
    ttl = query.pop("ttl", None)
    prefix = query.pop("prefix", DEFAULT_PREFIX)
    if ttl is not None and (not ttl.isdigit() or int(ttl) <= 0):
        raise ValueError(f"ttl={ttl!r} must be a positive whole number of seconds")
    return (int(ttl) if ttl else None), prefix
