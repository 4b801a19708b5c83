"""Redis tier: records as Redis strings under ``kvstash:<key>``, shared by every process and machine.

Redis owns capacity (its ``maxmemory`` policy) and expiry (an optional TTL, refreshed on hit). An
unreachable or failing server never raises to the caller: a get is a miss, a put is skipped, both are
counted in ``errors``, a warning is logged once per outage, and calls fail fast for ``retry_interval``
seconds after a failure instead of paying the socket timeout each time.

The event counters live beside the records, in the hash ``<prefix>@counters`` (``@`` is never in a chunk
key, so scans skip it), incremented with one pipelined ``HINCRBY`` round trip per batch of events
(:mod:`kvstash.store.counters`). Stats read record headers with ``GETRANGE``, never the payloads, and so
does a layer-at-a-time read (``Tier.open_layers``): one ``GETRANGE`` per header and per layer block.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from redis.exceptions import RedisError

from kvstash.store.base import KEY_RE, StoreConfig, Tier
from kvstash.store.counters import Counters
from kvstash.store.redis_client import open_client
from kvstash.store.scan import HeadInfo, header_end, parse_head

T = TypeVar("T")
DEFAULT_PREFIX = "kvstash:"
COUNTERS_SUFFIX = "@counters"
HEAD_READ = 1024  # first GETRANGE of a record for stats (enough for scan.parse_head's fast path)
_BATCH = 1000  # keys per pipeline in scans


class RedisCounters(Counters):
    """Counts shared through a Redis hash: ``HINCRBY`` per counter, pipelined in one round trip."""

    scope = "shared"

    def __init__(self, client: Any, key: str) -> None:
        super().__init__()
        self._client = client  # redis.Redis or LazyCluster (the tier's own)
        self.key = key

    def _load(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self._client.hgetall(self.key).items()}

    def _push(self, deltas: dict[str, int]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for name, delta in deltas.items():
            pipe.hincrby(self.key, name, delta)
        pipe.execute()


class RedisTier(Tier):
    name = "redis"

    def __init__(
        self,
        config: StoreConfig,
        url: str,
        *,
        ttl_seconds: int | None = None,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout: float = 0.5,
        retry_interval: float = 1.0,
    ) -> None:
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"redis ttl must be a positive number of seconds, got {ttl_seconds}")
        self._client = open_client(url, socket_timeout)
        self.url = url
        self.ttl_seconds = ttl_seconds
        self.prefix = prefix
        self.retry_interval = retry_interval
        self._down_until: dict[str, float] = {}  # where ("" = everywhere, or a node) -> monotonic time
        self._down_lock = threading.Lock()
        super().__init__(config, budget_bytes=None)

    def _make_counters(self) -> Counters:
        return RedisCounters(self._client, self.prefix + COUNTERS_SUFFIX)

    def _call(self, op: str, fn: Callable[[], T], default: T, where: str = "") -> T:
        """Run one Redis operation; on failure count it, back off (``where`` only: a node of a cluster,
        or "" for the whole tier), and return ``default``."""
        now = time.monotonic()
        if now < self._down_until.get("", 0.0) or (where and now < self._down_until.get(where, 0.0)):
            self._count(errors=1)
            return default
        try:
            result = fn()
        except (RedisError, OSError) as e:
            self._failed(op, e, where)
            return default
        self._backend_ok(where)
        if where:
            self._backend_ok("")  # a node answered: the cluster is reachable again
        return result

    def _failed(self, op: str, err: BaseException, where: str) -> None:
        with self._down_lock:
            self._down_until[where] = time.monotonic() + self.retry_interval
        self._backend_error(op, err, where)

    def _rkey(self, key: str) -> str:
        return self.prefix + key

    def _where(self, rkey: str) -> str:
        """Which part of the backend holds ``rkey``, for backing off: the single server is "" (all of it)."""
        return ""

    def _nodes(self) -> list[tuple[str, Any]]:
        """(name, plain client) of each server holding records: the one server here; a cluster's primaries."""
        return [("", self._client)]

    # --- Tier hooks -----------------------------------------------------------------------------

    def _read(self, key: str, touch: bool = True) -> bytes | None:
        rkey = self._rkey(key)
        if touch and self.ttl_seconds:
            return self._call("get", lambda: self._client.getex(rkey, ex=self.ttl_seconds), None, self._where(rkey))
        return self._call("get", lambda: self._client.get(rkey), None, self._where(rkey))

    def _read_range(self, key: str, offset: int, length: int, touch: bool = False) -> bytes | None:
        """``GETRANGE`` (with ``EXPIRE`` in the same round trip when touching under a TTL), through
        :meth:`_call`: an outage is counted and backed off like every other op. b"" for an absent key."""
        if length <= 0:
            return b""
        rkey, end = self._rkey(key), offset + length - 1
        if touch and self.ttl_seconds:
            fn = lambda: self._getrange_expire(rkey, offset, end)  # noqa: E731
        else:
            fn = lambda: self._client.getrange(rkey, offset, end)  # noqa: E731
        return self._call("getrange", fn, None, self._where(rkey))

    def _getrange_expire(self, rkey: str, start: int, end: int) -> bytes:
        pipe = self._client.pipeline(transaction=False)
        pipe.getrange(rkey, start, end).expire(rkey, self.ttl_seconds)
        return pipe.execute()[0]

    def _read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        rkeys = [self._rkey(k) for k in keys]
        return self._call("mget", lambda: self._client.mget(rkeys), [None] * len(keys))

    def _write(self, key: str, blob: bytes) -> bool:
        rkey = self._rkey(key)
        set_ = lambda: bool(self._client.set(rkey, blob, ex=self.ttl_seconds))  # noqa: E731
        return self._call("set", set_, False, self._where(rkey))

    def _remove(self, key: str) -> bool:
        rkey = self._rkey(key)
        return self._call("delete", lambda: self._client.delete(rkey) > 0, False, self._where(rkey))

    def _contains(self, key: str) -> bool:
        rkey = self._rkey(key)
        return self._call("exists", lambda: self._client.exists(rkey) > 0, False, self._where(rkey))

    def _node_keys(self, node: Any) -> list[bytes]:
        """Record keys (with the prefix) held by one server; the counters hash and foreign keys skipped."""
        match = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"
        n = len(self.prefix)
        keys = node.scan_iter(match=match, count=_BATCH)
        return [k for k in keys if KEY_RE.fullmatch(k[n:].decode(errors="replace"))]

    def _per_node(self, op: str, fn: Callable[[Any], list[T]]) -> list[T]:
        """``fn(node)`` over every server, concatenated; a server that fails is counted and skipped."""
        try:
            nodes = self._nodes()
        except (RedisError, OSError) as e:  # a cluster's slot map could not be had
            self._failed(op, e, "")
            return []
        out: list[T] = []
        for name, node in nodes:
            out += self._call(op, lambda node=node: fn(node), [], name)
        return out

    def _iter_keys(self) -> Iterator[str]:
        n = len(self.prefix)
        return iter([k[n:].decode() for k in self._per_node("scan", self._node_keys)])

    def _heads(self) -> Iterator[tuple[int, HeadInfo | None]]:
        return iter(self._per_node("stats", self._node_heads))

    def _node_heads(self, node: Any) -> list[tuple[int, HeadInfo | None]]:
        """Size and header of each record on one server: STRLEN + GETRANGE pipelined, a second GETRANGE
        for a header the first did not hold. Payloads are never fetched."""
        keys, out = self._node_keys(node), []
        for i in range(0, len(keys), _BATCH):
            batch = keys[i : i + _BATCH]
            pipe = node.pipeline(transaction=False)
            for k in batch:
                pipe.strlen(k).getrange(k, 0, HEAD_READ - 1)
            res = pipe.execute()
            sizes, heads = res[0::2], res[1::2]
            infos = [parse_head(h) for h in heads]
            longer = [
                (j, end) for j, h in enumerate(heads) if infos[j] is None and (end := header_end(h) or 0) > len(h)
            ]
            if longer:  # unusual headers: fetch them whole
                pipe = node.pipeline(transaction=False)
                for j, end in longer:
                    pipe.getrange(batch[j], len(heads[j]), end - 1)
                for (j, _), rest in zip(longer, pipe.execute(), strict=True):
                    infos[j] = parse_head(heads[j] + rest)
            out += [(size, info) for size, info in zip(sizes, infos, strict=True) if size]
        return out

    def _clear(self) -> None:
        def clear(node: Any) -> list[int]:
            keys = self._node_keys(node)
            for i in range(0, len(keys), _BATCH):
                pipe = node.pipeline(transaction=False)
                for k in keys[i : i + _BATCH]:
                    pipe.unlink(k)  # one key per command: a cluster node refuses keys of several slots
                pipe.execute()
            return []

        self._per_node("clear", clear)

    def close(self) -> None:
        super().close()
        self._client.close()
