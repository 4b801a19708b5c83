"""The model worker: one thread that owns the engine and runs its batching scheduler.

The engine is not thread-safe, so everything that touches the model happens on this thread: generations
(added to the :class:`~kvstash.batch.scheduler.Scheduler`, which runs all of them together, one batched pass
per step) and other jobs such as computing a document's KV (run between two steps). A request handler talks
to it through a :class:`Job`: zero or more ``("delta", TextDelta)`` events, then ``("done", result)`` or
``("error", exception)``. A job whose client went away is cancelled: dropped from the queue, or stopped at
the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvstash.batch.scheduler import Scheduler, StepStats
from kvstash.batch.sequence import Sequence
from kvstash.compress.pipeline import Compression
from kvstash.decoding import TextDelta
from kvstash.reuse.base import ReuseMethod
from kvstash.sampling import SamplingParams
from kvstash.speculate.speculation import SpecConfig

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many requests are waiting for the model; retry later."""


class ShuttingDown(Exception):
    """The worker stopped before the job ran."""


class Cancelled(Exception):
    """The job was cancelled (its client went away) before it ran."""


class Job:
    """One unit of model work and the channel its events come back on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._cancel = threading.Event()
        self.enqueued_at = time.perf_counter()
        self.started_at: float | None = None  # when the model took it (queue wait = started_at - enqueued_at)
        self.first_token_at: float | None = None  # generations: when their first token was chosen

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the job to stop: a queued job is dropped, a running generation stops at the next step."""
        self._cancel.set()

    def emit(self, kind: str, value: Any = None) -> None:
        """Send an event to the handler (from the worker thread)."""
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

    async def next_event(self) -> tuple[str, Any]:
        return await self._events.get()


@dataclass
class Generate:
    """A generation to add to the scheduler: ``prepare()`` (run on the worker) plans the prompt."""

    job: Job
    prepare: Callable[[], Any]  # -> PromptPlan; may raise (e.g. context overflow)
    params: SamplingParams
    method: ReuseMethod
    compression: Compression
    speculate: SpecConfig | None = None


@dataclass
class Call:
    """Any other model work: ``fn(job)`` runs on the worker between two steps; its return value is the result."""

    job: Job
    fn: Callable[[Job], Any]


class Worker:
    """Runs the scheduler on one thread. ``on_step(stats, scheduler)`` and ``on_finish(seq)`` report to metrics."""

    def __init__(
        self,
        scheduler: Scheduler,
        max_queue: int = 64,
        on_step: Callable[[StepStats, Scheduler], None] | None = None,
        on_finish: Callable[[Sequence], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.max_queue = max_queue
        self.on_step, self.on_finish = on_step, on_finish
        self._inbox: queue.Queue[Generate | Call | None] = queue.Queue()
        # every model computation runs on this one thread: a multi-threaded torch op on any other thread gives
        # OpenMP a second team, libgomp then counts more threads than cores and stops spinning between parallel
        # regions, and decoding runs ~40% slower on 2 cores (measured: 19 vs 31 tokens/s)
        self._thread = threading.Thread(target=self._run, name="kvstash-model", daemon=True)
        self._busy = False  # a Call is running
        self._stopping = False
        self._stopped = False

    # --- the handlers' side (event loop) --------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Requests waiting: not yet seen by the scheduler, or waiting in it for room in the batch."""
        return self._inbox.qsize() + len(self.scheduler.waiting)

    @property
    def running(self) -> int:
        """Sequences in the batch (prefilling or decoding), plus a running job."""
        return len(self.scheduler.running) + int(self._busy)

    def start(self) -> None:
        self._thread.start()

    def generate(
        self, prepare, params: SamplingParams, method: ReuseMethod, compression: Compression, speculate=None
    ) -> Job:
        """Queue a generation. Call from the event loop. QueueFull / ShuttingDown when it cannot be taken."""
        job = self._new_job()
        self._inbox.put(Generate(job, prepare, params, method, compression, speculate))
        return job

    def submit(self, fn: Callable[[Job], Any]) -> Job:
        """Queue other model work, ``fn(job)``. Call from the event loop. QueueFull / ShuttingDown as above."""
        job = self._new_job()
        self._inbox.put(Call(job, fn))
        return job

    def _new_job(self) -> Job:
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        if self.queued >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting for the model")
        return Job(asyncio.get_running_loop())

    def drain(self) -> None:
        """Refuse new work and fail everything still queued with ShuttingDown; the batch goes on."""
        self._stopping = True
        self._inbox.put(None)  # wakes the thread, which fails the queued work

    def cancel_running(self) -> None:
        """Cancel every sequence in the batch (each gets its error event at the next step)."""
        self._inbox.put(None)
        for seq in list(self.scheduler.running):
            seq.tag.cancel()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain the queue, cancel the batch and wait for the thread to end."""
        self._stopped = True
        self.drain()
        self.cancel_running()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the model worker did not stop within %.0f s", timeout)

    # --- the worker's side -------------------------------------------------------------------------------
    def _run(self) -> None:
        sched = self.scheduler
        sched.runner.choose_kernels()  # timed here, on this thread, before the first request
        log.info(json.dumps({"event": "kernels", **sched.runner.kernels()}))
        while not (self._stopped and not sched.running):
            self._take(block=not sched.has_work)
            if self._stopping:
                self._fail_waiting()
            for seq in list(sched.running) + list(sched.waiting):
                if seq.tag.cancelled:
                    sched.cancel(seq)
            if sched.has_work:
                try:
                    stats = sched.step()
                except Exception as e:  # noqa: BLE001 - a bug in one pass must not kill the server
                    log.error("a batched step failed; failing its sequences", exc_info=e)
                    for seq in list(sched.running):
                        sched.cancel(seq)
                        seq.tag.emit("error", e)
                    continue
                if self.on_step is not None:
                    self.on_step(stats, sched)

    def _take(self, block: bool) -> None:
        """Move what handlers queued into the scheduler (run other jobs now); wait for work when idle."""
        while True:
            try:
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if item is None:
                continue
            if item.job.cancelled:
                item.job.emit("error", Cancelled("cancelled before it ran"))
            elif self._stopping:
                item.job.emit("error", ShuttingDown("the server is shutting down"))
            elif isinstance(item, Call):
                self._call(item)
            else:
                self._add(item)

    def _call(self, item: Call) -> None:
        self._busy, item.job.started_at = True, time.perf_counter()
        try:
            item.job.emit("done", item.fn(item.job))
        except Exception as e:  # reported to the handler, which answers or logs it
            item.job.emit("error", e)
        finally:
            self._busy = False

    def _add(self, item: Generate) -> None:
        job = item.job
        try:
            plan = item.prepare()
            self.scheduler.add(
                plan,
                item.params,
                item.method,
                item.compression,
                on_delta=self._delta,
                on_done=self._done,
                tag=job,
                speculate=item.speculate,
            )
        except Exception as e:  # bad input found on the worker (context overflow, KV budget): the handler answers
            job.emit("error", e)

    def _fail_waiting(self) -> None:
        for seq in list(self.scheduler.waiting):
            self.scheduler.waiting.remove(seq)
            seq.tag.emit("error", ShuttingDown("the server is shutting down"))

    def _delta(self, seq: Sequence, text: str) -> None:
        job = seq.tag
        if job.first_token_at is None:
            job.started_at, job.first_token_at = seq.admitted, seq.first_token_at
        job.emit("delta", TextDelta(text, seq.dec.new_logprobs()))

    def _done(self, seq: Sequence) -> None:
        job = seq.tag
        job.started_at = job.started_at or seq.admitted
        job.first_token_at = job.first_token_at or seq.first_token_at
        if self.on_finish is not None:
            self.on_finish(seq)
        if seq.error is not None:
            job.emit("error", seq.error)
        elif seq.result is not None:
            job.emit("done", seq.result)
        else:  # cancelled: its client is gone, or the server is stopping
            job.emit(
                "error", ShuttingDown("the generation was cancelled") if self._stopping else Cancelled("cancelled")
            )
