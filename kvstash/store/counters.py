"""Event counters of a tier (hits, misses, corrupt, ...), kept where every process sharing the tier sees them.

:class:`Counters` holds this process's counts in memory; a shared subclass also adds them, batched, to the
tier's backend: :class:`FileCounters` (a JSON file in a disk tier's directory, read-modify-write under
``fcntl.flock``, replaced by an atomic rename) and ``RedisCounters`` in :mod:`kvstash.store.redis_tier`
(``HINCRBY`` on a hash under the tier's prefix). Pending counts are pushed every :data:`FLUSH_EVERY` events,
when :data:`FLUSH_SECONDS` have passed at the next event, on ``totals`` (stats), on ``close`` and when the
process exits normally. A crash loses at most the counts not pushed yet; the shared totals are never torn
(a power cut may also lose the disk file's last updates: it is renamed into place but not fsynced, and an
unreadable file counts again from zero).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import ClassVar

log = logging.getLogger(__name__)

NAMES = ("hits", "misses", "evictions", "corrupt", "errors", "rejected", "puts")
FLUSH_EVERY = 64  # pending events that trigger a push
FLUSH_SECONDS = 1.0  # a push is also due at the first event this long after the last one


class Counters:
    """This process's counts only (the RAM tier's). Thread-safe."""

    scope: ClassVar[str] = "process"  # what ``totals`` covers: this process, or every process sharing the tier

    def __init__(self) -> None:
        self._pending = dict.fromkeys(NAMES, 0)  # counted here, not pushed yet (all of them for a process scope)
        self._events = 0  # events in _pending since the last push
        self._last_push = time.monotonic()
        self._lock = threading.Lock()  # guards _pending, _events, _last_push
        self._push_lock = threading.Lock()  # one push at a time
        self._push_failing = False  # warn once per run of failed pushes or reads

    def add(self, **deltas: int) -> None:
        """Count events (``hits=1``, ``errors=2``); pushes the pending counts when due."""
        with self._lock:
            for name, delta in deltas.items():
                self._pending[name] += delta
            self._events += 1
            due = self._events >= FLUSH_EVERY or time.monotonic() - self._last_push >= FLUSH_SECONDS
        if due and self.scope == "shared":
            self.flush(wait=False)

    def totals(self) -> dict[str, int]:
        """Every count: pushed ones read back from the backend plus this process's pending ones. When the
        backend cannot be read, this process's pending counts only (logged)."""
        self.flush()
        try:
            shared = self._load()
        except Exception as e:  # noqa: BLE001 - the backend's own error types; stats must not fail
            self._warn_once(f"could not read shared store counters ({e}); showing this process's only")
            shared = {}
        else:
            self._push_failing = False
        with self._lock:
            return {n: int(shared.get(n, 0)) + self._pending[n] for n in NAMES}

    def flush(self, wait: bool = True) -> bool:
        """Push the pending counts to the backend. Returns False if they stay pending (backend failed, or
        another thread is pushing and ``wait`` is False)."""
        if self.scope != "shared":
            return True
        if not self._push_lock.acquire(blocking=wait):
            return False
        try:
            with self._lock:
                deltas = {n: d for n, d in self._pending.items() if d}
                self._pending = dict.fromkeys(NAMES, 0)
                self._events, self._last_push = 0, time.monotonic()
            if not deltas:
                return True
            try:
                self._push(deltas)
            except Exception as e:  # noqa: BLE001 - kept and pushed later; the tier's own ops count errors
                self._restore(deltas, e)
                return False
            self._push_failing = False
            return True
        finally:
            self._push_lock.release()

    def _restore(self, deltas: dict[str, int], err: Exception) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._pending[name] += delta
        self._warn_once(f"could not push store counters ({err}); keeping them to push later")

    def _warn_once(self, message: str) -> None:
        """Log the first backend failure of a run of them (a success ends the run)."""
        if not self._push_failing:
            self._push_failing = True
            log.warning(message)

    def close(self) -> None:
        """Push what is pending (best effort)."""
        self.flush()

    # --- what a shared backend supplies -----------------------------------------------------------

    def _load(self) -> dict[str, int]:
        """The pushed totals (nothing for a process scope)."""
        return {}

    def _push(self, deltas: dict[str, int]) -> None:
        """Add ``deltas`` to the pushed totals, atomically with respect to other processes."""
        raise NotImplementedError


class FileCounters(Counters):
    """Counts shared through ``<dir>/.kvstash-counters.json``: each push takes an exclusive ``flock`` on
    ``<dir>/.kvstash-counters.lock``, reads the totals, adds, writes a temp file and renames it over the
    totals, so readers (no lock) see the old or the new totals and concurrent pushers lose nothing."""

    scope = "shared"
    FILE = ".kvstash-counters.json"
    LOCK = ".kvstash-counters.lock"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.path = root / self.FILE
        self._lock_path = root / self.LOCK

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            log.warning("%s is damaged (%s); counting again from zero", self.path, e)
            return {}
        return {n: int(data.get(n, 0)) for n in NAMES}

    def _push(self, deltas: dict[str, int]) -> None:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            totals = self._load()
            for name, delta in deltas.items():
                totals[name] = totals.get(name, 0) + delta
            tmp = self.path.with_name(f".counters.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            try:
                tmp.write_text(json.dumps(totals, sort_keys=True))
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        finally:
            os.close(fd)  # releases the lock
