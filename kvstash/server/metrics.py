"""Server metrics, exposed through ``prometheus_client``: the request handlers and the model worker count here;
a collector on the app's own :class:`CollectorRegistry` (several apps may live in one process) turns the counts,
the store's per-tier counters and the queue into metric families when ``/metrics`` is read, next to the
standard ``process_*`` metrics."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from kvstash.batch.scheduler import Scheduler, StepStats
from kvstash.batch.sequence import Sequence as BatchSequence
from kvstash.engine import GenerationResult
from kvstash.store import TierStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
TPOT_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # seconds per output token after the first
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # sequences decoding in one step
TOKEN_KINDS = ("prompt", "completion", "reused", "recomputed")


class Histogram:
    """Observations counted per bucket; :meth:`family` is the Prometheus view (cumulative buckets)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, le in enumerate(self.buckets):
            if value <= le:
                self.counts[i] += 1
                break
        self.total += 1
        self.sum += value

    def family(self, name: str, help_: str) -> HistogramMetricFamily:
        buckets, running = [], 0
        for le, n in zip(self.buckets, self.counts, strict=True):
            running += n
            buckets.append((str(le), running))
        buckets.append(("+Inf", self.total))
        return HistogramMetricFamily(name, help_, buckets=buckets, sum_value=self.sum)


class Metrics:
    """Counters the request handlers and the worker update; :meth:`render` is the ``/metrics`` text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (method, route, status) -> count
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tokens: Counter[str] = Counter()  # prompt, completion, reused, recomputed
        self.generations: Counter[str] = Counter()  # finish reason (stop, length, cancelled, error) -> count
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.queue = Histogram(QUEUE_BUCKETS)
        self.preemptions = 0
        self.swap = {"written": 0, "read": 0, "failed": 0}  # preempted KV to swap files and back (the scheduler's)
        self.steps = 0
        self._live: tuple[Sequence[TierStats], int, int] = ((), 0, 0)  # tiers, queued, running: set by render
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)

    def request(self, method: str, route: str, status: int) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1

    def generation(self, result: GenerationResult, ttft_s: float) -> None:
        with self._lock:
            self.ttft.observe(ttft_s)
            self.tokens["prompt"] += result.prompt_tokens
            self.tokens["completion"] += result.completion_tokens
            self.tokens["reused"] += result.prefill.reused_tokens
            self.tokens["recomputed"] += result.prefill.recomputed_tokens
            self.generations[result.finish_reason] += 1

    def step(self, stats: StepStats, scheduler: Scheduler) -> None:
        """One batched step of the scheduler (called on the model worker's thread)."""
        with self._lock:
            self.steps += 1
            self.preemptions += stats.preempted
            if scheduler.swap is not None:
                self.swap = {k: getattr(scheduler.swap, k) for k in self.swap}
            if stats.decoding:
                self.batch_size.observe(stats.decoding)

    def sequence_done(self, seq: BatchSequence) -> None:
        """A sequence left the scheduler: its queue time and time per output token, or how it ended badly."""
        with self._lock:
            if seq.admitted is not None:
                self.queue.observe(seq.admitted - seq.arrived)
            if seq.result is None:
                self.generations["error" if seq.error is not None else "cancelled"] += 1
            elif seq.result.completion_tokens > 1:
                self.tpot.observe(seq.result.decode_s / (seq.result.completion_tokens - 1))

    def render(self, tiers: Sequence[TierStats], queued: int, running: int) -> str:
        """The Prometheus text of every metric, with the store's tiers and the queue as they are now."""
        with self._lock:
            self._live = (tuple(tiers), queued, running)
        return generate_latest(self.registry).decode()


class _Collector:
    """The kvstash metric families, read from a :class:`Metrics` when the registry is collected."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        with self.m._lock:
            yield from self._requests()
            yield from self._batch()
            tiers, queued, running = self.m._live
        yield from _tier_families(tiers)
        yield GaugeMetricFamily("kvstash_queue_depth", "Requests waiting for a place in the batch.", value=queued)
        yield GaugeMetricFamily("kvstash_running", "Requests in the batch (prefilling or decoding).", value=running)

    def _requests(self) -> Iterator[Metric]:
        m = self.m
        requests = CounterMetricFamily(
            "kvstash_requests_total", "HTTP requests by method, route and status.", labels=["method", "route", "status"]
        )
        for (method, route, status), n in sorted(m.requests.items()):
            requests.add_metric([method, route, str(status)], n)
        yield requests
        yield m.ttft.family("kvstash_ttft_seconds", "Request arrival to first token (queue included).")
        tokens = CounterMetricFamily(
            "kvstash_tokens_total", "Tokens by kind: prompt, completion, reused, recomputed.", labels=["kind"]
        )
        for kind in TOKEN_KINDS:
            tokens.add_metric([kind], m.tokens[kind])
        yield tokens
        prompt = m.tokens["prompt"]
        recomputed, reused = (m.tokens["recomputed"] / prompt, m.tokens["reused"] / prompt) if prompt else (0.0, 0.0)
        yield GaugeMetricFamily(
            "kvstash_recomputed_share", "Recomputed prompt tokens / prompt tokens.", value=recomputed
        )
        yield GaugeMetricFamily(
            "kvstash_reused_share", "Prompt tokens whose KV came from the store / prompt tokens.", value=reused
        )
        reasons = CounterMetricFamily("kvstash_generations_total", "Generations by how they ended.", labels=["reason"])
        for reason, n in sorted(m.generations.items()):
            reasons.add_metric([reason], n)
        yield reasons

    def _batch(self) -> Iterator[Metric]:
        m = self.m
        yield m.batch_size.family("kvstash_batch_size", "Sequences decoding together, per batched step.")
        yield m.tpot.family("kvstash_time_per_output_token_seconds", "Decode time per token, per request.")
        yield m.queue.family("kvstash_queue_seconds", "Arrival to admission into the batch, per request.")
        yield CounterMetricFamily(
            "kvstash_preemptions_total", "Requests preempted to stay in the KV budget.", value=m.preemptions
        )
        swaps = CounterMetricFamily(
            "kvstash_swap",
            "Preempted KV written to swap files, read back, or failed (then recomputed).",
            labels=["event"],
        )
        for event, n in m.swap.items():
            swaps.add_metric([event], n)
        yield swaps
        yield CounterMetricFamily("kvstash_steps_total", "Batched steps run.", value=m.steps)


def _tier_families(tiers: Sequence[TierStats]) -> Iterator[Metric]:
    """Per-tier hits, misses, entries and bytes; and the hit rate of all lookups (a lookup tries the tiers in
    order: it is a hit in one of them, or a miss in the last)."""
    names = [t.name for t in tiers]
    labels = [f"{n}{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]  # two disk tiers
    for field, kind, help_ in (
        ("hits", "counter", "Chunk store lookups answered, per tier."),
        ("misses", "counter", "Chunk store lookups not answered, per tier."),
        ("entries", "gauge", "Chunk records held, per tier."),
        ("bytes", "gauge", "Bytes of chunk records held, per tier."),
    ):
        if kind == "counter":
            family = CounterMetricFamily(f"kvstash_cache_{field}_total", help_, labels=["tier"])
        else:
            family = GaugeMetricFamily(f"kvstash_cache_{field}", help_, labels=["tier"])
        for label, t in zip(labels, tiers, strict=True):
            family.add_metric([label], getattr(t, field))
        yield family
    hits = sum(t.hits for t in tiers)
    lookups = hits + (tiers[-1].misses if tiers else 0)
    yield GaugeMetricFamily(
        "kvstash_cache_hit_rate",
        "Chunk store lookups answered by some tier / all lookups.",
        value=hits / lookups if lookups else 0.0,
    )
