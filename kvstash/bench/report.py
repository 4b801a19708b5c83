"""Benchmark results as a markdown table, results.json, results.csv and a quality-vs-TTFT plot."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvstash.bench.methods import MethodSpec
from kvstash.bench.metrics import summarize

CSV_FIELDS = (
    "method", "ttft_s", "ttft_p90_s", "speedup_vs_full", "accuracy", "f1", "agreement", "kl",
    "prompt_tokens", "recomputed_tokens", "reused_tokens", "kv_bytes", "peak_rss_mb", "n",
    "decode_tok_s", "tokens_per_forward", "same_as_plain", "flips", "flip_gap_max", "requests_per_s",
    "completion_tok_s",
    "reuse", "codec", "kv_bits", "kv_alloc", "evict", "speculate",
)  # fmt: skip
# (header, summary field, format) of the markdown table's columns
TABLE = (
    ("method", "method", "{}"),
    ("TTFT med (s)", "ttft_s", "{:.3f}"),
    ("TTFT p90 (s)", "ttft_p90_s", "{:.3f}"),
    ("speedup", "speedup_vs_full", "{:.2f}x"),
    ("computed tok", "recomputed_tokens", "{:.0f}"),
    ("reused tok", "reused_tokens", "{:.0f}"),
    ("accuracy", "accuracy", "{:.2f}"),
    ("F1", "f1", "{:.3f}"),
    ("agree w/ full", "agreement", "{:.2f}"),
    ("KL(full‖m)", "kl", "{:.4f}"),
    ("KV MiB", "kv_bytes", "mib"),
    ("decode tok/s", "decode_tok_s", "{:.1f}"),
    ("req/s", "requests_per_s", "{:.3f}"),
    ("tok/fwd", "tokens_per_forward", "{:.2f}"),
    ("= plain", "same_as_plain", "{:.2f}"),
)


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(float(x) for x in xs)


def summarize_methods(rows: list[dict[str, Any]], methods: Sequence[MethodSpec]) -> list[dict[str, Any]]:
    """One summary per method from the per-example rows; the first method (full) is the speedup reference.

    ``ttft_s`` is the median (under load with ``--concurrency``), ``requests_per_s`` and ``completion_tok_s``
    the throughput of the generate calls, ``accuracy`` the contains-gold rate, ``agreement`` the share of
    answers equal to full prefill's after normalization, ``kl`` the mean over examples of the mean per-token KL;
    token counts and KV bytes are means per example; ``peak_rss_mb`` is the process's high-water mark after
    the method ran.
    """
    out = []
    ref_median = None
    for spec in methods:
        mine = [r for r in rows if r["method"] == spec.name]
        if not mine:
            continue
        ttft = summarize([r["ttft_s"] for r in mine])
        ref_median = ref_median or ttft["median"]
        out.append(
            {
                "method": spec.name,
                "reuse": spec.reuse,
                "codec": spec.codec,
                "kv_bits": spec.kv_bits,
                "kv_alloc": spec.kv_alloc or ("uniform" if spec.kv_bits else None),
                "evict": spec.evict,
                "n": len(mine),
                "ttft_s": round(ttft["median"], 4),
                "ttft_p90_s": round(ttft["p90"], 4),
                "ttft_mean_s": round(ttft["mean"], 4),
                "speedup_vs_full": round(ref_median / ttft["median"], 3) if ttft["median"] > 0 else None,
                "accuracy": round(_mean([r["contains"] for r in mine]), 4),
                "f1": round(_mean([r["f1"] for r in mine]), 4),
                "agreement": round(_mean([r["agree"] for r in mine]), 4),
                "kl": round(_mean([r["kl"] for r in mine]), 6),
                "prompt_tokens": round(_mean([r["prompt_tokens"] for r in mine]), 1),
                "recomputed_tokens": round(_mean([r["recomputed_tokens"] for r in mine]), 1),
                "reused_tokens": round(_mean([r["reused_tokens"] for r in mine]), 1),
                "kv_bytes": round(_mean([r["kv_bytes"] for r in mine])),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                "decode_tok_s": round(statistics.median(r.get("decode_tok_s") or 0.0 for r in mine), 2),
                "tokens_per_forward": _mean_of(r.get("tokens_per_forward") for r in mine),
                **_throughput(mine),
                "speculate": spec.speculate,
                "same_as_plain": _same_as(rows, spec) if spec.speculate or spec.reuse == "hf-lookup" else None,
                **(_flips(mine) if spec.speculate and spec.plain == "full" else {}),
            }
        )
    return out


def _throughput(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Answers and answer tokens per second of generation wall time (the generate calls only, not the scoring
    prefills): one request at a time, or several together with ``--concurrency``. None for the baselines."""
    seconds = [r.get("gen_s") for r in rows]
    if None in seconds or sum(seconds) <= 0:
        return {"requests_per_s": None, "completion_tok_s": None}
    total = sum(seconds)
    tokens = sum(r.get("completion_tokens", 0) for r in rows)
    return {"requests_per_s": round(len(rows) / total, 4), "completion_tok_s": round(tokens / total, 2)}


def _flips(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """For ``full+spec``: answers that left plain full's, and full's top-1/top-2 logit gap where they did."""
    gaps = [r["divergence"]["gap"] for r in rows if r.get("divergence")]
    return {"flips": len(gaps), "flip_gap_max": max(gaps) if gaps else None}


def _mean_of(values) -> float | None:
    xs = [v for v in values if v is not None]
    return round(_mean(xs), 3) if xs else None


def _same_as(rows: list[dict[str, Any]], spec: MethodSpec) -> float | None:
    """Share of examples where ``spec``'s answer is identical to the plain method's (``X+spec`` vs ``X``;
    ``hf-lookup`` vs ``hf``); None when the plain method was not run."""
    plain = "hf" if spec.reuse == "hf-lookup" else spec.plain
    base = {r["id"]: r["answer"] for r in rows if r["method"] == plain}
    mine = [r for r in rows if r["method"] == spec.name and r["id"] in base]
    return round(_mean([r["answer"] == base[r["id"]] for r in mine]), 4) if mine else None


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "—"
    if fmt == "mib":
        return f"{value / 2**20:.1f}"
    return fmt.format(value)


def markdown_table(methods: list[dict[str, Any]]) -> str:
    """The summaries as a GitHub markdown table, one row per method."""
    lines = ["| " + " | ".join(h for h, _, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for m in methods:
        lines.append("| " + " | ".join(_cell(m.get(key), fmt) for _, key, fmt in TABLE) + " |")
    return "\n".join(lines)


def headline(config: dict[str, Any]) -> str:
    """One line saying what was run."""
    opts = "".join(f", {k}={v}" for k, v in config.get("dataset_options", {}).items())
    return (
        f"{config['dataset']}: n={config['n']}, passages={config['passages']}, max_tokens={config['max_tokens']}, "
        f"concurrency={config.get('concurrency', 1)}, "
        f"seed={config['seed']}{opts}; {config['model']} ({config['dtype']}), threads={config['threads']}; "
        f"{config['elapsed_s']:.0f} s, peak RSS {config['peak_rss_mb']:.0f} MiB"
    )


def write_json(result, path: Path) -> None:
    data = {"config": result.config, "methods": result.methods, "examples": result.examples}
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(methods: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(methods)


def plot_quality_vs_ttft(methods: list[dict[str, Any]], config: dict[str, Any], path: Path) -> None:
    """One point per method: quality (F1 or contains-gold accuracy) against median TTFT, as in CacheBlend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = config.get("quality_metric", "accuracy")
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    markers = "osD^vP*Xph"
    for i, m in enumerate(methods):
        ax.scatter(m["ttft_s"], m[metric], s=45, marker=markers[i % len(markers)], label=m["method"], zorder=3)
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("time to first token, median (s)")
    ax.set_ylabel("F1" if metric == "f1" else "accuracy (gold in answer)")
    ax.set_xlim(left=0)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.set_title(f"{config['dataset']} (n={config['n']}, {config['passages']} passages, {config['model']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_all(result, out_dir: str | Path) -> dict[str, Path]:
    """results.json, results.csv and quality_vs_ttft.png in ``out_dir`` (created); returns their paths."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "png": out / "quality_vs_ttft.png"}
    write_json(result, paths["json"])
    write_csv(result.methods, paths["csv"])
    plot_quality_vs_ttft(result.methods, result.config, paths["png"])
    return paths
