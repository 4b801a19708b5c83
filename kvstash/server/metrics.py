"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

from kvstash.batch.scheduler import Scheduler, StepStats
from kvstash.batch.sequence import Sequence as BatchSequence
from kvstash.engine import GenerationResult
from kvstash.store import TierStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
TPOT_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # seconds per output token after the first
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # sequences decoding in one step


class Histogram:
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

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for le, n in zip(self.buckets, self.counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.total}"]
        return out


class Metrics:
    """Counters the request handlers update; ``render`` adds the store's per-tier counters and the queue."""

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
        self.steps = 0

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
        with self._lock:
            lines = _family("kvstash_requests_total", "counter", "HTTP requests by method, route and status.")
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f'kvstash_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
            lines += _family("kvstash_ttft_seconds", "histogram", "Request arrival to first token (queue included).")
            lines += self.ttft.lines("kvstash_ttft_seconds")
            lines += _family(
                "kvstash_tokens_total", "counter", "Tokens by kind: prompt, completion, reused, recomputed."
            )
            for kind in ("prompt", "completion", "reused", "recomputed"):
                lines.append(f'kvstash_tokens_total{{kind="{kind}"}} {self.tokens[kind]}')
            share = self.tokens["recomputed"] / self.tokens["prompt"] if self.tokens["prompt"] else 0.0
            lines += _family("kvstash_recomputed_share", "gauge", "Recomputed prompt tokens / prompt tokens.")
            lines.append(f"kvstash_recomputed_share {share:.6f}")
            lines += _family("kvstash_generations_total", "counter", "Generations by how they ended.")
            for reason, n in sorted(self.generations.items()):
                lines.append(f'kvstash_generations_total{{reason="{reason}"}} {n}')
            lines += self._batch_lines()
        names = [t.name for t in tiers]
        labels = [f"{n}{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]  # two disk tiers
        for field, kind, help_ in (
            ("hits", "counter", "Chunk store lookups answered, per tier."),
            ("misses", "counter", "Chunk store lookups not answered, per tier."),
            ("entries", "gauge", "Chunk records held, per tier."),
            ("bytes", "gauge", "Bytes of chunk records held, per tier."),
        ):
            name = f"kvstash_cache_{field}_total" if kind == "counter" else f"kvstash_cache_{field}"
            lines += _family(name, kind, help_)
            lines += [f'{name}{{tier="{label}"}} {getattr(t, field)}' for label, t in zip(labels, tiers, strict=True)]
        lines += _family("kvstash_queue_depth", "gauge", "Requests waiting for a place in the batch.")
        lines.append(f"kvstash_queue_depth {queued}")
        lines += _family("kvstash_running", "gauge", "Requests in the batch (prefilling or decoding).")
        lines.append(f"kvstash_running {running}")
        return "\n".join(lines) + "\n"

    def _batch_lines(self) -> list[str]:
        lines = _family("kvstash_batch_size", "histogram", "Sequences decoding together, per batched step.")
        lines += self.batch_size.lines("kvstash_batch_size")
        lines += _family("kvstash_time_per_output_token_seconds", "histogram", "Decode time per token, per request.")
        lines += self.tpot.lines("kvstash_time_per_output_token_seconds")
        lines += _family("kvstash_queue_seconds", "histogram", "Arrival to admission into the batch, per request.")
        lines += self.queue.lines("kvstash_queue_seconds")
        lines += _family("kvstash_preemptions_total", "counter", "Requests preempted to stay in the KV budget.")
        lines.append(f"kvstash_preemptions_total {self.preemptions}")
        lines += _family("kvstash_steps_total", "counter", "Batched steps run.")
        lines.append(f"kvstash_steps_total {self.steps}")
        return lines


def _family(name: str, kind: str, help_: str) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
