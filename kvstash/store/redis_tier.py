"""Redis tier: records as Redis strings under ``kvstash:<key>``, shared by every process and machine.

Redis owns capacity (its ``maxmemory`` policy) and expiry (an optional TTL, refreshed on hit). An
unreachable or failing server never raises to the caller: a get is a miss, a put is skipped, both are
counted in ``errors``, a warning is logged once per outage, and calls fail fast for ``retry_interval``
seconds after a failure instead of paying the socket timeout each time.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from kvstash.store.base import StoreConfig, Tier

T = TypeVar("T")
DEFAULT_PREFIX = "kvstash:"


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
        super().__init__(config, budget_bytes=None)
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"redis ttl must be a positive number of seconds, got {ttl_seconds}")
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=Retry(NoBackoff(), 1),  # one immediate retry covers a pooled connection gone stale
            )
        except ValueError as e:
            raise ValueError(f"bad redis URL {url!r} ({e}); use redis://host:port/db") from e
        self.url = url
        self.ttl_seconds = ttl_seconds
        self.prefix = prefix
        self.retry_interval = retry_interval
        self._down_until = 0.0  # time.monotonic() before which calls fail fast
        self._down_lock = threading.Lock()

    def _call(self, op: str, fn: Callable[[], T], default: T) -> T:
        """Run one Redis operation; on failure count it, back off, and return ``default``."""
        if time.monotonic() < self._down_until:
            self._count(errors=1)
            return default
        try:
            result = fn()
        except (RedisError, OSError) as e:
            with self._down_lock:
                self._down_until = time.monotonic() + self.retry_interval
            self._backend_error(op, e)
            return default
        self._backend_ok()
        return result

    def _rkey(self, key: str) -> str:
        return self.prefix + key

    # --- Tier hooks -----------------------------------------------------------------------------

    def _read(self, key: str, touch: bool = True) -> bytes | None:
        rkey = self._rkey(key)
        if touch and self.ttl_seconds:
            return self._call("get", lambda: self._client.getex(rkey, ex=self.ttl_seconds), None)
        return self._call("get", lambda: self._client.get(rkey), None)

    def _read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        rkeys = [self._rkey(k) for k in keys]
        return self._call("mget", lambda: self._client.mget(rkeys), [None] * len(keys))

    def _write(self, key: str, blob: bytes) -> bool:
        rkey = self._rkey(key)
        return self._call("set", lambda: bool(self._client.set(rkey, blob, ex=self.ttl_seconds)), False)

    def _remove(self, key: str) -> bool:
        return self._call("delete", lambda: self._client.delete(self._rkey(key)) > 0, False)

    def _contains(self, key: str) -> bool:
        return self._call("exists", lambda: self._client.exists(self._rkey(key)) > 0, False)

    def _scan_keys(self) -> list[str]:
        match = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"
        n = len(self.prefix)
        return [k.decode()[n:] for k in self._client.scan_iter(match=match, count=1000)]

    def _iter_keys(self) -> Iterator[str]:
        return iter(self._call("scan", self._scan_keys, []))

    def _usage(self) -> tuple[int, int]:
        """Entries and bytes under the prefix: one SCAN plus a pipelined STRLEN per key (O(entries))."""

        def usage() -> tuple[int, int]:
            keys = self._scan_keys()
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.strlen(self._rkey(key))
            return len(keys), sum(pipe.execute()) if keys else 0

        return self._call("stats", usage, (0, 0))

    def _clear(self) -> None:
        def clear() -> None:
            keys = [self._rkey(k) for k in self._scan_keys()]
            for i in range(0, len(keys), 1000):
                self._client.unlink(*keys[i : i + 1000])

        self._call("clear", clear, None)

    def close(self) -> None:
        self._client.close()
