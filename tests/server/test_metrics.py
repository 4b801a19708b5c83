"""``/metrics`` text from :class:`kvstash.server.metrics.Metrics`: today's names and labels exactly, one registry per
app (two apps in one process do not share counts), the process metrics, the hit-rate and reused-share gauges."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from kvstash.server.metrics import Metrics


def _tier(name: str, hits: int, misses: int) -> SimpleNamespace:
    return SimpleNamespace(name=name, hits=hits, misses=misses, entries=2, bytes=4096)


def _result(prompt: int, reused: int, recomputed: int) -> SimpleNamespace:
    report = SimpleNamespace(reused_tokens=reused, recomputed_tokens=recomputed)
    return SimpleNamespace(prompt_tokens=prompt, completion_tokens=5, prefill=report, finish_reason="stop")


def test_names_labels_and_values():
    m = Metrics()
    m.request("POST", "/v1/chat/completions", 200)
    m.request("POST", "/v1/chat/completions", 200)
    m.generation(_result(100, 75, 25), 0.3)
    text = m.render([_tier("ram", 3, 2), _tier("disk", 1, 1)], queued=4, running=2)
    lines = set(text.splitlines())
    for line in (
        'kvstash_requests_total{method="POST",route="/v1/chat/completions",status="200"} 2.0',
        'kvstash_ttft_seconds_bucket{le="0.25"} 0.0',
        'kvstash_ttft_seconds_bucket{le="0.5"} 1.0',
        'kvstash_ttft_seconds_bucket{le="+Inf"} 1.0',
        "kvstash_ttft_seconds_count 1.0",
        'kvstash_tokens_total{kind="prompt"} 100.0',
        'kvstash_tokens_total{kind="reused"} 75.0',
        "kvstash_recomputed_share 0.25",
        "kvstash_reused_share 0.75",
        'kvstash_generations_total{reason="stop"} 1.0',
        'kvstash_cache_hits_total{tier="ram"} 3.0',
        'kvstash_cache_misses_total{tier="disk"} 1.0',
        'kvstash_cache_bytes{tier="ram"} 4096.0',
        "kvstash_cache_hit_rate 0.8",  # 4 hits of 5 lookups (the last tier's misses are the lookups nobody answered)
        "kvstash_queue_depth 4.0",
        "kvstash_running 2.0",
        'kvstash_batch_size_bucket{le="1"} 0.0',
        "kvstash_preemptions_total 0.0",
        'kvstash_swap_total{event="written"} 0.0',
        'kvstash_swap_total{event="failed"} 0.0',
        "kvstash_steps_total 0.0",
        "# TYPE kvstash_requests_total counter",
        "# TYPE kvstash_ttft_seconds histogram",
        "# TYPE kvstash_cache_entries gauge",
    ):
        assert line in lines, line
    assert "process_cpu_seconds_total" in text and "process_resident_memory_bytes" in text
    assert {f.name for f in text_string_to_metric_families(text)} >= {"kvstash_requests", "kvstash_cache_hit_rate"}


def test_each_app_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.request("GET", "/health", 200)
    assert 'route="/health"' in a.render([], 0, 0) and 'route="/health"' not in b.render([], 0, 0)
    assert "kvstash_cache_hit_rate 0.0" in b.render([], 0, 0)  # no lookups yet


def test_steps_count_preemptions_and_the_schedulers_swaps():
    from kvstash.batch.scheduler import StepStats

    m = Metrics()
    swap = SimpleNamespace(written=3, read=2, failed=1)
    m.step(StepStats(decoding=4, prefill_tokens=0, seconds=0.05, preempted=2), SimpleNamespace(swap=swap))
    m.step(StepStats(decoding=2, prefill_tokens=0, seconds=0.05, preempted=1), SimpleNamespace(swap=None))
    lines = set(m.render([], queued=0, running=0).splitlines())
    for line in (
        "kvstash_preemptions_total 3.0",
        'kvstash_swap_total{event="written"} 3.0',
        'kvstash_swap_total{event="read"} 2.0',
        'kvstash_swap_total{event="failed"} 1.0',
        "kvstash_steps_total 2.0",
    ):
        assert line in lines, line
