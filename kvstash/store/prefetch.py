"""Prefetcher: start loading chunks in background threads while the caller does other work."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from kvstash.store.base import Hit


class Readable(Protocol):
    """Anything with the store's ``get``: a :class:`TieredStore` or a single tier."""

    def get(self, key: str, token_ids: Sequence[int]) -> Hit | None: ...


class Prefetcher:
    """``start`` submits loads to a thread pool; ``get(key)`` waits for that load and returns what
    ``store.get`` returned (a :class:`Hit` or None). Use as a context manager or call :meth:`close`.
    Meant for one caller thread; the loads themselves run concurrently (tiers are thread-safe)."""

    def __init__(self, store: Readable, max_workers: int = 4) -> None:
        if max_workers < 1:
            raise ValueError(f"Prefetcher max_workers must be >= 1, got {max_workers}")
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvstash-prefetch")
        self._pending: dict[str, Future[Hit | None]] = {}  # key -> load in flight or done

    def start(self, items: Iterable[tuple[str, Sequence[int]]]) -> None:
        """Begin loading each (key, token_ids) not already started. Returns at once."""
        for key, token_ids in items:
            if key not in self._pending:
                ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)  # own copy
                self._pending[key] = self._pool.submit(self.store.get, key, ids)

    def get(self, key: str, timeout: float | None = None) -> Hit | None:
        """The :class:`Hit` (None on a miss), waiting for it if needed; forgets the key afterwards.
        KeyError if ``key`` was never started; TimeoutError after ``timeout`` seconds."""
        future = self._pending.get(key)
        if future is None:
            raise KeyError(f"{key!r} was not prefetched; call start([(key, token_ids)]) first")
        result = future.result(timeout=timeout)  # re-raises whatever the load raised
        del self._pending[key]
        return result

    def pending(self) -> list[str]:
        """Keys started and not yet collected with :meth:`get`."""
        return list(self._pending)

    def close(self) -> None:
        """Cancel loads not yet running and wait for the running ones."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
