"""Redis clients from a URL: one server (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster
(``redis+cluster://HOST:PORT[,HOST:PORT...]``, through redis-py's ``RedisCluster``).

Opening a client never contacts the server: a cluster client is built on first use (``RedisCluster``
reads the slot map when it is constructed), so a cluster that is down at start-up shows up as a
``redis.ConnectionError`` on the first command, like a single server that is down.
"""

from __future__ import annotations

import threading
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

CLUSTER_SCHEME = "redis+cluster://"


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """``redis+cluster://a:7000,b:7001`` -> [("a", 7000), ("b", 7001)]. ValueError with the syntax if bad."""
    rest = url.removeprefix(CLUSTER_SCHEME)
    nodes = []
    for part in rest.split("/")[0].split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad cluster node {part!r}: use {CLUSTER_SCHEME}HOST:PORT[,HOST:PORT...]")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


class LazyCluster:
    """A ``RedisCluster`` built on first use and rebuilt after a failed build; attribute access delegates.
    Building it from ``startup_nodes`` fails while no node answers: that is a ``redis.ConnectionError``."""

    def __init__(self, nodes: list[tuple[str, int]], **kwargs: Any) -> None:
        self.nodes = nodes
        self._kwargs = kwargs
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()

    def client(self) -> RedisCluster:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = RedisCluster(
                            startup_nodes=[ClusterNode(h, p) for h, p in self.nodes], **self._kwargs
                        )
                    except RedisClusterException as e:  # "no startup node could be reached", a bad slot map
                        raise redis.ConnectionError(f"redis cluster {self.nodes}: {e}") from e
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client(), name)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def open_client(url: str, socket_timeout: float) -> redis.Redis | LazyCluster:
    """A client for ``url`` that fails fast: ``socket_timeout`` for connecting and each reply, one immediate
    retry (a pooled connection gone stale). ValueError on a URL redis-py cannot read."""
    retry = Retry(NoBackoff(), 1)
    if url.startswith(CLUSTER_SCHEME):
        return LazyCluster(
            cluster_nodes(url),
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=retry,
            require_full_coverage=False,  # a node down costs its own slots, not the whole map
        )
    try:
        return redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, retry=retry
        )
    except ValueError as e:
        raise ValueError(f"bad redis URL {url!r} ({e}); use redis://host:port/db") from e
