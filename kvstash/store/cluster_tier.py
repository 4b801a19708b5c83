"""Redis Cluster tier: the Redis tier's records, guarantees and counters over a cluster's nodes.

Spec: ``redis+cluster://HOST:PORT[,HOST:PORT...][?ttl=SECONDS&prefix=P]`` (any nodes of the cluster; the
client reads the slot map from the first that answers and follows MOVED / ASK itself). Each record is one
key, so records spread over every node by hash slot. A batched read groups the keys by the node that
owns their slot and sends one pipeline per node; a node that is down costs only its own keys: they are
counted errors and misses, and calls to that node (not the others) fail fast for ``retry_interval``.
When the node is back at the same address the tier uses it again by itself. A layer-at-a-time read
(``Tier.open_layers``) sends each ``GETRANGE`` through the cluster client to the node owning the key's slot.

Run the cluster with ``cluster-require-full-coverage no``: with the default ``yes`` every node refuses
every key (CLUSTERDOWN) once one node is marked failed, which the tier survives as misses everywhere.
The counters hash ``<prefix>@counters`` lives in one slot, so on one node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvstash.store.redis_tier import RedisTier


class RedisClusterTier(RedisTier):
    name = "redis-cluster"

    def _where(self, rkey: str) -> str:
        """The node that owns ``rkey``'s slot ("" while the slot map cannot be had: the whole tier)."""
        try:
            return self._client.get_node_from_key(rkey).name
        except Exception:  # noqa: BLE001 - no slot map yet (cluster unreachable); the call itself will count it
            return ""

    def _nodes(self) -> list[tuple[str, Any]]:
        client = self._client.client()
        return [(n.name, client.get_redis_connection(n)) for n in client.get_primaries()]

    def _read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        rkeys = [self._rkey(k) for k in keys]
        by_node: dict[str, list[int]] = {}
        for i, rkey in enumerate(rkeys):
            by_node.setdefault(self._where(rkey), []).append(i)
        out: list[bytes | None] = [None] * len(keys)
        for where, idx in by_node.items():
            got = self._call("get_many", lambda idx=idx: self._get_pipelined([rkeys[i] for i in idx]), None, where)
            for i, blob in zip(idx, got or [None] * len(idx), strict=True):
                out[i] = blob
        return out

    def _get_pipelined(self, rkeys: list[str]) -> list[bytes | None]:
        """GET (GETEX with a TTL) of keys on one node, in one cluster pipeline round trip."""
        pipe = self._client.pipeline()
        for rkey in rkeys:
            if self.ttl_seconds:
                pipe.getex(rkey, ex=self.ttl_seconds)
            else:
                pipe.get(rkey)
        return pipe.execute()
