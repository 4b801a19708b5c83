"""RAM tier: encoded records in an LRU ordered dict, bounded by a byte budget. Its counters are its
process's (nothing else can see the tier)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

from kvstash.store.base import StoreConfig, Tier
from kvstash.store.scan import HeadInfo, parse_head

DEFAULT_RAM_BUDGET = 2 * 1024**3  # bytes, used when a spec says just "ram"


class RamTier(Tier):
    """Records in process memory. Eviction is lazy: ``put`` drops least-recently-used records until the
    new one fits. A record larger than the whole budget is not stored (counted as ``rejected``)."""

    name = "ram"

    def __init__(self, config: StoreConfig, budget_bytes: int = DEFAULT_RAM_BUDGET) -> None:
        super().__init__(config, budget_bytes)
        self._entries: OrderedDict[str, bytes] = OrderedDict()  # least recently used first
        self._bytes = 0  # sum of len(blob) over _entries
        self._lock = threading.Lock()  # guards _entries and _bytes

    def _read(self, key: str, touch: bool = True) -> bytes | None:
        with self._lock:
            blob = self._entries.get(key)
            if blob is not None and touch:
                self._entries.move_to_end(key)
            return blob

    def _write(self, key: str, blob: bytes) -> bool:
        assert self.budget_bytes is not None
        if len(blob) > self.budget_bytes:
            self._count(rejected=1)
            return False
        evicted = 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            while self._bytes + len(blob) > self.budget_bytes:
                _, victim = self._entries.popitem(last=False)
                self._bytes -= len(victim)
                evicted += 1
            self._entries[key] = blob
            self._bytes += len(blob)
        if evicted:
            self._count(evictions=evicted)
        return True

    def _remove(self, key: str) -> bool:
        with self._lock:
            blob = self._entries.pop(key, None)
            if blob is None:
                return False
            self._bytes -= len(blob)
            return True

    def _contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def _iter_keys(self) -> Iterator[str]:
        with self._lock:
            snapshot = list(self._entries)
        return iter(snapshot)

    def _heads(self) -> Iterator[tuple[int, HeadInfo | None]]:
        with self._lock:
            blobs = list(self._entries.values())
        return ((len(b), parse_head(b)) for b in blobs)

    def _clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def lru_keys(self) -> list[str]:
        """Keys from least to most recently used (the eviction order)."""
        with self._lock:
            return list(self._entries)

    def check_integrity(self) -> None:
        """Raise RuntimeError with the numbers if the byte accounting does not add up."""
        with self._lock:
            actual = sum(len(b) for b in self._entries.values())
            entries, counted = len(self._entries), self._bytes
        assert self.budget_bytes is not None
        if actual != counted or counted > self.budget_bytes:
            raise RuntimeError(
                f"ram tier accounting broken: {entries} entries hold {actual} bytes, counted {counted}, "
                f"budget {self.budget_bytes}"
            )
