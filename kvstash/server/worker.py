"""The model worker: one thread that runs jobs on the engine one at a time, fed by a bounded queue.

The engine is not thread-safe, so everything that touches the model (generation, document KV) is a job.
A job reports back to the asyncio request handler that submitted it through an event queue: zero or more
``("delta", text)`` events, then ``("done", result)`` or ``("error", exception)``. A job whose client went
away is cancelled: skipped if still queued, stopped between tokens if running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue in front of the model is full; retry later."""


class ShuttingDown(Exception):
    """The worker stopped before the job ran."""


class Cancelled(Exception):
    """The job was cancelled (its client went away) before it ran."""


class Job:
    """One unit of model work and the channel its events come back on."""

    def __init__(self, fn: Callable[[Job], Any], loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn  # runs on the worker thread: fn(job) -> result; may call job.emit and read job.cancelled
        self._loop = loop
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._cancel = threading.Event()
        self.enqueued_at = time.perf_counter()
        self.started_at: float | None = None  # when the worker took it (queue wait = started_at - enqueued_at)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the job to stop: a queued job is skipped, a running one stops at its next check."""
        self._cancel.set()

    def emit(self, kind: str, value: Any = None) -> None:
        """Send an event to the handler (from the worker thread)."""
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

    async def next_event(self) -> tuple[str, Any]:
        return await self._events.get()


class Worker:
    """Runs submitted jobs in order on one thread. ``stop`` fails the queued jobs and ends the thread."""

    def __init__(self, max_queue: int = 64) -> None:
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="kvstash-model", daemon=True)
        self._current: Job | None = None
        self._stopping = False

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return int(self._current is not None)

    def start(self) -> None:
        self._thread.start()

    def submit(self, fn: Callable[[Job], Any]) -> Job:
        """Queue ``fn`` (called as ``fn(job)`` on the worker thread). Call from the event loop.
        Raises QueueFull when the queue is full, ShuttingDown after ``stop``."""
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        job = Job(fn, asyncio.get_running_loop())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting for the model") from None
        return job

    def drain(self) -> None:
        """Refuse new jobs and fail every queued one with ShuttingDown; the running job goes on."""
        self._stopping = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", ShuttingDown("the server is shutting down"))

    def cancel_running(self) -> None:
        current = self._current
        if current is not None:
            current.cancel()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain the queue, cancel the running job and wait for the thread to end."""
        self.drain()
        self.cancel_running()
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the model worker did not stop within %.0f s", timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled:
                job.emit("error", Cancelled("cancelled before it ran"))
                continue
            self._current = job
            job.started_at = time.perf_counter()
            try:
                job.emit("done", job.fn(job))
            except Exception as e:  # reported to the handler, which answers or logs it
                job.emit("error", e)
            finally:
                self._current = None
