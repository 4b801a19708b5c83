"""A real redis-server for tests: a free loopback port, no persistence, in a temp dir.

Test modules import the fixture: ``from tests.redis_server import redis_url  # noqa: F401``.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

REDIS_BINARY = shutil.which("redis-server") or "/usr/bin/redis-server"


def redis_available() -> bool:
    return Path(REDIS_BINARY).is_file()


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default when it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(offsets: tuple[int, ...] = (0,)) -> int:
    """A port P with P + each offset free, all below the kernel's ephemeral range, so a server stopped and
    started again on it (as these tests do) never finds it taken by an outgoing connection in between."""
    low, high = 10000, ephemeral_ports()[0] - 1 - max(offsets)
    for _ in range(200):
        port = random.randint(low, high)
        try:
            for p in (port + o for o in offsets):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port in {low}-{high} (with offsets {offsets})")


class RedisServer:
    """One redis-server process. ``start`` waits until it answers PING; ``stop`` ends it. The port is
    kept across stop/start so a test can take the server down and bring it back at the same URL."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="kvstash-redis-"))
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def server_args(self) -> list[str]:
        return ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def start(self, timeout: float = 10.0) -> None:
        log = open(self._dir / "redis.log", "wb")  # noqa: SIM115 - kept open for the process
        args = self.server_args()
        self._proc = subprocess.Popen(
            [REDIS_BINARY, *args, "--dir", str(self._dir)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                output = (self._dir / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}:\n{output}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout}s") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


def skip_without_redis() -> None:
    if not redis_available():
        pytest.skip(f"redis-server binary not found ({REDIS_BINARY}); run scripts/install-redis.sh")


def start_server(attempts: int = 3) -> RedisServer:
    """A started server; retries on a new port if another process took the free one first."""
    for attempt in range(attempts):
        server = RedisServer()
        try:
            server.start()
            return server
        except RuntimeError:
            server.cleanup()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a redis-server shared by the session. Tests keep apart with their own key prefixes."""
    skip_without_redis()
    server = start_server()
    yield server.url
    server.cleanup()
