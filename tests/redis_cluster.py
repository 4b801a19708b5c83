"""A real 3-node Redis Cluster for tests, on loopback, one temp dir per node, no persistence of data.

Nodes run with ``cluster-require-full-coverage no`` (what the README recommends for a cache): a node
that goes down costs its own slots only. Its ``nodes-PORT.conf`` stays in its dir, so ``start_node``
brings it back at the same address with the same slots. Test modules import the fixture:
``from tests.redis_cluster import redis_cluster  # noqa: F401``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from tests.redis_server import RedisServer, free_port, skip_without_redis

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def cluster_port() -> int:
    """A free port P with P + 10000 (the cluster bus) free too, both below the ephemeral range (see
    :func:`free_port`): a node killed and restarted on P must find it free."""
    return free_port(offsets=(0, 10000))


class ClusterNodeServer(RedisServer):
    """One cluster-enabled redis-server."""

    def server_args(self) -> list[str]:
        return [*super().server_args(), "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf",
                "--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no"]  # fmt: skip


class RedisClusterProcesses:
    """Three primaries, no replicas, every slot covered. ``url`` is the store spec's node list."""

    def __init__(self, size: int = 3) -> None:
        self.nodes = [ClusterNodeServer(cluster_port()) for _ in range(size)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        out = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
        self.wait_ok()

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Until every running node says cluster_state:ok and knows every node."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if not node.running:
                continue
            client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=0.5)
            while True:
                try:
                    info = client.cluster("info")
                    if info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == len(self.nodes):
                        break
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {node.port} not ok after {timeout}s")
                time.sleep(0.05)
            client.close()

    def node_of(self, rkey: str) -> ClusterNodeServer:
        """The node that owns ``rkey``'s slot."""
        client = RedisCluster(host="127.0.0.1", port=next(n for n in self.nodes if n.running).port)
        port = client.get_node_from_key(rkey).port
        client.close()
        return next(n for n in self.nodes if n.port == port)

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


def skip_without_cluster_tools() -> None:
    skip_without_redis()
    if not shutil.which(REDIS_CLI):
        pytest.skip(f"redis-cli not found ({REDIS_CLI}); run scripts/install-redis.sh")


@pytest.fixture
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    """A fresh 3-node cluster per test (tests stop and restart its nodes)."""
    skip_without_cluster_tools()
    cluster = RedisClusterProcesses()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()
