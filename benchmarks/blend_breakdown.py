"""Where blend's time to first token goes, on ~4K-token prompts, next to full prefill and naive reuse.

    .venv/bin/python benchmarks/blend_breakdown.py --n 6 --passages 8 --dtype bfloat16

For each prompt (needle-code, chunk KV already in the store) every method's prefill is timed ``--repeat``
times (the median kept), and blend's is cut into phases: load (chunk KV out of the store), re-position (keys
rotated into the cache), probe (the question's naive pass for its focus), full layers (every token, layers up
to and including the check layer), partial layers (the chosen tokens and the question, the later layers) and
the first token's logits. The compute-share ceiling is what recomputing only the budget would cost if the
full layers and the partial layers cost in proportion to their tokens:
``(check + 1) / L + ratio * (L - check - 1) / L`` of full prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tqdm import tqdm

import kvstash.reuse.partial as partial_mod
from kvstash.bench.datasets import load_dataset
from kvstash.engine import Engine
from kvstash.prompt import Segment
from kvstash.reuse.blend import BlendConfig, BlendReuse, CacheBlendReuse
from kvstash.reuse.full import FullPrefill
from kvstash.reuse.partial import NaiveReuse, PartialPrefill
from kvstash.reuse.source import ChunkSource

PHASES = ("load", "reposition", "probe", "full_layers", "partial_layers", "logits", "other")


class Clock:
    """Phase timestamps of one prefill, filled by the timed methods below."""

    def __init__(self):
        self.marks: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.marks[phase] = self.marks.get(phase, 0.0) + seconds


def timed(cls):
    """``cls`` (a blend method) with its probe, full layers, partial layers and logits timed into ``self.clock``."""

    class Timed(cls):
        clock: Clock

        def pass_steps(self, runner, cache, layout, observe=None):
            t0 = time.perf_counter()
            yield from self.focus_steps(runner, cache, layout)
            t1 = time.perf_counter()
            self.clock.add("probe", t1 - t0)
            stamps: list[float] = []
            steps = PartialPrefill.pass_steps(
                self, runner, cache, layout, lambda *a: stamps.append(time.perf_counter())
            )
            result = yield from _timed_logits(steps, runner, self.clock)
            end = self.clock.marks.pop("_pass_end")
            split = stamps[self.cfg.check_layer + 1]  # attention of the first partial layer begins
            self.clock.add("full_layers", split - t1)
            self.clock.add("partial_layers", end - split)
            return result

    return Timed


def _timed_logits(steps, runner, clock: Clock):
    """Drive the pass's steps, stamping when the last pass returns (the logits follow)."""
    real_logits = runner.logits

    def logits(h):
        t = time.perf_counter()
        clock.marks["_pass_end"] = t
        out = real_logits(h)
        clock.add("logits", time.perf_counter() - t)
        return out

    runner.logits = logits
    try:
        return (yield from steps)
    finally:
        runner.logits = real_logits


def run(args) -> dict:
    engine = Engine(dtype=args.dtype, threads=args.threads)
    source = ChunkSource.open(engine.runner, engine.lm.fingerprint, args.store, args.codec)
    examples = load_dataset("needle-code", n=args.n, passages=args.passages, seed=args.seed)
    chunk = engine.config.prefill_chunk
    blend_cls, cb_cls = timed(BlendReuse), timed(CacheBlendReuse)
    current = time_layout(source)
    rows = []
    for ex in tqdm(examples, desc="prompts"):
        plan = engine.plan([Segment(d) for d in ex.documents] + [Segment(ex.question, "user")])
        current["clock"] = Clock()
        NaiveReuse().prefill(engine.runner, plan, source)  # every chunk in the store
        row = {"tokens": len(plan)}
        row["full"] = _median_time(lambda p=plan: FullPrefill(chunk).prefill(engine.runner, p), args.repeat)
        row["naive"] = _median_time(lambda p=plan: NaiveReuse(chunk).prefill(engine.runner, p, source), args.repeat)
        current["clock"] = Clock()
        for name, cls in (("blend", blend_cls), ("cacheblend", cb_cls)):
            runs = []
            for _ in range(args.repeat):
                method = cls(BlendConfig(ratio=args.ratio), chunk)
                method.clock = current["clock"] = Clock()
                t = time.perf_counter()
                pre = method.prefill(engine.runner, plan, source)
                total = time.perf_counter() - t
                marks = method.clock.marks
                marks["total"] = total
                marks["other"] = total - sum(marks.get(p, 0.0) for p in PHASES if p != "other")
                runs.append(marks)
            row[name] = {p: statistics.median(r.get(p, 0.0) for r in runs) for p in (*PHASES, "total")}
            row[name]["recomputed"] = pre.report.recomputed_ratio
        rows.append(row)
    return {"config": vars(args), "rows": rows, "summary": summarize(rows, engine, args)}


def time_layout(source: ChunkSource) -> dict:
    """Time the layout (load + re-position) and the store reads inside it into the current method's clock."""
    real_layout, real_standalone = partial_mod.lay_out, source.standalone
    current = {}

    def standalone(*a, **kw):
        t = time.perf_counter()
        out = yield from real_standalone(*a, **kw)
        current["clock"].add("load", time.perf_counter() - t)
        return out

    def lay_out(*a, **kw):
        t = time.perf_counter()
        out = yield from real_layout(*a, **kw)
        clock = current["clock"]
        clock.add("reposition", time.perf_counter() - t - clock.marks.get("load", 0.0))
        return out

    source.standalone, partial_mod.lay_out = standalone, lay_out
    return current


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def summarize(rows: list[dict], engine: Engine, args) -> dict:
    layers, check = engine.runner.num_layers, BlendConfig().check_layer
    out = {
        "tokens": statistics.median(r["tokens"] for r in rows),
        "full_s": statistics.median(r["full"] for r in rows),
        "naive_s": statistics.median(r["naive"] for r in rows),
        "ceiling_share": (check + 1) / layers + args.ratio * (layers - check - 1) / layers,
    }
    for name in ("blend", "cacheblend"):
        out[name] = {p: statistics.median(r[name][p] for r in rows) for p in (*PHASES, "total", "recomputed")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6, help="prompts (needle-code)")
    ap.add_argument("--passages", type=int, default=8, help="passages per prompt (8 musique passages: ~4K tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per method and prompt (median kept)")
    ap.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="auto: bf16 where the CPU has it"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--codec", default="fp16")
    ap.add_argument("--store", default="ram:4GiB", help="store spec the chunks are read from")
    ap.add_argument("--out", type=Path, default=Path("out/blend-breakdown.json"))
    args = ap.parse_args()
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    s = result["summary"]
    print(
        f"median prompt {s['tokens']:.0f} tokens; full prefill {s['full_s']:.2f} s; naive {s['naive_s']:.2f} s; "
        f"compute-share ceiling {s['ceiling_share']:.1%} of full ({1 / s['ceiling_share']:.1f}x)"
    )
    print("| phase | " + " | ".join(("blend s", "blend share", "cacheblend s", "cacheblend share")) + " |")
    print("|---|---|---|---|---|")
    for p in (*PHASES, "total"):
        cells = []
        for name in ("blend", "cacheblend"):
            v = s[name][p]
            cells += [f"{v:.3f}", f"{v / s['full_s']:.1%} of full"]
        print(f"| {p} | " + " | ".join(cells) + " |")
    for name in ("blend", "cacheblend"):
        print(f"{name}: {s['full_s'] / s[name]['total']:.2f}x faster than full, recomputed {s[name]['recomputed']:.1%}")


if __name__ == "__main__":
    main()
