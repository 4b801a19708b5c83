"""Blend variants against full prefill on needle (and musique) prompts, in one run.

    .venv/bin/python benchmarks/blend_study.py --dataset needle --n 24 --passages 6 --out out/blend-study

For every example, full prefill is the reference: its greedy answer, and its next-token distributions along
that answer (teacher-forced). Each variant is then measured with the example's chunk KV already in the RAM
store: prefill time (TTFT proxy), share of prompt tokens recomputed, needle found (gold contained in the
greedy answer), answer agreement with full, and mean KL(full || variant) over full's answer tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from blend_variants import GradualBlend
from tqdm import tqdm

from kvstash.bench.datasets import load_dataset
from kvstash.bench.metrics import answers_agree, contains_gold, kl_divergence
from kvstash.engine import Engine
from kvstash.prompt import Segment
from kvstash.reuse.blend import BlendConfig, BlendReuse
from kvstash.reuse.full import FullPrefill
from kvstash.reuse.partial import NaiveReuse
from kvstash.reuse.source import ChunkSource
from kvstash.sampling import SamplingParams

VARIANTS: dict[str, dict | None] = {
    "naive": None,
    "blend r=0.15 (plain)": dict(ratio=0.15),
    "blend r=0.30 (plain)": dict(ratio=0.30),
    "blend r=0.15 gradual 0.4>0.15": dict(ratio=0.15, schedule=(0.4,)),
    "blend r=0.15 check@2": dict(ratio=0.15, check_layer=2),
    "blend r=0.15 question 0.5": dict(ratio=0.15, query_share=0.5),
    "blend r=0.15 question 0.75": dict(ratio=0.15, query_share=0.75),
    "blend r=0.15 question 1.0": dict(ratio=0.15, query_share=1.0),
    "blend r=0.15 question 0.75 stale bias -0.25": dict(ratio=0.15, query_share=0.75, stale_bias=-0.25),
    "blend r=0.15 question 0.75 stale bias -0.5": dict(ratio=0.15, query_share=0.75, stale_bias=-0.5),
    "blend r=0.15 question 0.75 stale bias -1.0": dict(ratio=0.15, query_share=0.75, stale_bias=-1.0),
    "blend r=0.15 question 0.75 stale bias +0.25": dict(ratio=0.15, query_share=0.75, stale_bias=0.25),
    "blend question 0.75 gradual 0.3 to layer 9 then 0.1": dict(ratio=0.1, query_share=0.75, schedule=(0.3,) * 9),
    "blend question 0.75 gradual 0.3 to layer 9 then 0.1 stale bias -0.25": dict(
        ratio=0.1, query_share=0.75, schedule=(0.3,) * 9, stale_bias=-0.25
    ),
    "blend r=0.19 question 0.75": dict(ratio=0.19, query_share=0.75),
    "blend r=0.17 question 1.0 check@0": dict(ratio=0.17, query_share=1.0, check_layer=0),
    "blend r=0.15 question 0.25": dict(ratio=0.15, query_share=0.25),
}


def method_for(name: str, spec: dict | None, chunk: int):
    if spec is None:
        return NaiveReuse(prefill_chunk=chunk)
    # variants are plain CacheBlend unless they name a question share or a stale bias
    spec = {"query_share": 0.0, "stale_bias": 0.0, **spec}
    schedule = spec.pop("schedule", ())
    if schedule:
        return GradualBlend(BlendConfig(**spec), schedule, prefill_chunk=chunk)
    return BlendReuse(BlendConfig(**spec), prefill_chunk=chunk)


def greedy(engine: Engine, pre, max_tokens: int) -> list[int]:
    """Greedy answer ids after a prefill, leaving ``pre.cache`` as it was (it is scored teacher-forced next)."""
    return engine.decode(replace(pre, cache=pre.cache.clone()), SamplingParams(max_tokens=max_tokens)).token_ids


def run(args) -> dict:
    engine = Engine(codec=args.codec)
    source = ChunkSource.open(engine.runner, engine.lm.fingerprint, "ram:4GiB", args.codec)
    examples = load_dataset(args.dataset, n=args.n, passages=args.passages, seed=args.seed)
    names = [v for v in VARIANTS if not args.only or v in args.only]
    unknown = set(args.only or ()) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    rows: dict[str, list[dict]] = {"full": [], **{n: [] for n in names}}
    full_m = FullPrefill(engine.config.prefill_chunk)
    for ex in tqdm(examples, desc="examples"):
        segs = [Segment(d) for d in ex.documents] + [Segment(ex.question, "user")]
        plan = engine.plan(segs)
        t = time.perf_counter()
        ref = full_m.prefill(engine.runner, plan)
        full_s = time.perf_counter() - t
        ref_ids = greedy(engine, ref, args.max_tokens)
        ref_text = engine.tokenizer.decode(ref_ids, skip_special_tokens=True)
        ref_logits = engine.teacher_forced_logits(ref, ref_ids)
        rows["full"].append(
            dict(
                ttft=full_s,
                text=ref_text,
                found=contains_gold(ref_text, ex.answers),
                agree=True,
                kl=0.0,
                recomputed=1.0,
                tokens=len(plan),
            )
        )
        NaiveReuse().prefill(engine.runner, plan, source)  # warm: every chunk in the store
        for name in names:
            method = method_for(name, VARIANTS[name], engine.config.prefill_chunk)
            t = time.perf_counter()
            pre = method.prefill(engine.runner, plan, source)
            ttft = time.perf_counter() - t
            ids = greedy(engine, pre, args.max_tokens)
            text = engine.tokenizer.decode(ids, skip_special_tokens=True)
            kl = kl_divergence(ref_logits, engine.teacher_forced_logits(pre, ref_ids)).mean().item()
            rows[name].append(
                dict(
                    ttft=ttft,
                    text=text,
                    found=contains_gold(text, ex.answers),
                    agree=answers_agree(text, ref_text),
                    kl=kl,
                    recomputed=pre.report.recomputed_ratio,
                    gate=pre.report.gate_fired,
                )
            )
        source.store.clear()  # each example starts cold; the warm-up above fills what it needs
        if args.out:  # partial results after every example
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{args.dataset}.partial.json").write_text(json.dumps(summarize(rows, args), default=str))
    return summarize(rows, args)


def summarize(rows: dict[str, list[dict]], args) -> dict:
    full_ttft = statistics.median(r["ttft"] for r in rows["full"])
    table = []
    for name, rs in rows.items():
        ttft = statistics.median(r["ttft"] for r in rs)
        table.append(
            dict(
                method=name,
                n=len(rs),
                found=sum(r["found"] for r in rs),
                agree=sum(r["agree"] for r in rs),
                kl=statistics.mean(r["kl"] for r in rs),
                recomputed=statistics.mean(r["recomputed"] for r in rs),
                ttft_s=ttft,
                speedup=full_ttft / ttft,
            )
        )
    return {"config": vars(args), "summary": table, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="needle")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--passages", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--codec", default="fp16")
    ap.add_argument("--only", type=lambda s: s.split(","), help="comma-separated variant names to run (default all)")
    ap.add_argument("--out", type=Path, default=Path("out/blend-study"))
    args = ap.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.dataset}.json").write_text(json.dumps(result, indent=1, default=str))
    print("| variant | needle/gold found | agree w/ full | mean answer KL | recomputed | TTFT s | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in result["summary"]:
        print(
            f"| {r['method']} | {r['found']}/{r['n']} | {r['agree']}/{r['n']} | {r['kl']:.3f} | "
            f"{r['recomputed']:.1%} | {r['ttft_s']:.2f} | {r['speedup']:.1f}x |"
        )


if __name__ == "__main__":
    main()
