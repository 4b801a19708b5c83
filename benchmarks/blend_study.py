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
from pathlib import Path

import torch
from tqdm import tqdm

from kvstash.bench.datasets import load_dataset
from kvstash.bench.metrics import answers_agree, contains_gold, kl_divergence
from kvstash.blend import BlendConfig, BlendReuse, NaiveReuse
from kvstash.chunks import ChunkSource
from kvstash.engine import Engine
from kvstash.prompt import Segment
from kvstash.reuse import FullPrefill, Prefilled

VARIANTS: dict[str, dict | None] = {
    "naive": None,
    "blend r=0.15 (plain)": dict(ratio=0.15),
    "blend r=0.30 (plain)": dict(ratio=0.30),
    "blend r=0.15 kv-dev": dict(ratio=0.15, select_by="kv"),
    "blend r=0.15 per-chunk": dict(ratio=0.15, per_chunk=True),
    "blend r=0.15 gradual 0.4>0.15": dict(ratio=0.15, schedule=(0.4,)),
    "blend r=0.15 check@2": dict(ratio=0.15, check_layer=2),
    "blend r=0.15 sink=4": dict(ratio=0.15, sink=4),
    "blend r=0.15 head-ctx": dict(ratio=0.15, head_context=True),
    "blend r=0.15 question 0.5": dict(ratio=0.15, query_share=0.5),
    "blend r=0.15 question 0.75": dict(ratio=0.15, query_share=0.75),
    "blend r=0.15 question 1.0": dict(ratio=0.15, query_share=1.0),
    "blend r=0.15 question 0.5 pool 15": dict(ratio=0.15, query_share=0.5, focus_pool=15),
    "blend r=0.15 question 0.75 sink=4": dict(ratio=0.15, query_share=0.75, sink=4),
    "blend r=0.15 question 0.75 from 10": dict(ratio=0.15, query_share=0.75, focus_from=10),
    "blend r=0.15 question 0.75 from 20": dict(ratio=0.15, query_share=0.75, focus_from=20),
    "blend r=0.15 question 0.75 per chunk": dict(ratio=0.15, query_share=0.75, focus_scope="chunk"),
    "blend r=0.15 question 0.75 relative": dict(ratio=0.15, query_share=0.75, focus_scope="relative"),
    "blend r=0.15 question 0.75 max": dict(ratio=0.15, query_share=0.75, focus_reduce="max"),
    "blend r=0.15 question 0.5 max": dict(ratio=0.15, query_share=0.5, focus_reduce="max"),
    "blend r=0.15 question 0.75 keys x1.1": dict(ratio=0.15, query_share=0.75, stale_key_scale=1.1),
    "blend r=0.15 question 0.75 keys x0.9": dict(ratio=0.15, query_share=0.75, stale_key_scale=0.9),
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
    "blend r=0.15 question 0.75 head-ctx": dict(ratio=0.15, query_share=0.75, head_context=True),
    "blend r=0.15 question 0.25": dict(ratio=0.15, query_share=0.25),
    "blend r=0.15 question chunk 1.0": dict(ratio=0.15, query_share=1.0, focus_by_chunk=True),
    "blend r=0.15 question chunk 0.5": dict(ratio=0.15, query_share=0.5, focus_by_chunk=True),
    "naive head-ctx": dict(ratio=0.0, head_context=True, naive=True),
    "blend r=0.15 head-ctx gradual": dict(ratio=0.15, head_context=True, schedule=(0.4,)),
}


def method_for(name: str, spec: dict | None, chunk: int):
    if spec is None:
        return NaiveReuse(BlendConfig(), prefill_chunk=chunk)
    # variants are plain CacheBlend unless they name a question share or a stale bias
    spec = {"query_share": 0.0, "stale_bias": 0.0, **spec}
    if spec.pop("naive", False):
        return NaiveReuse(BlendConfig(**spec), prefill_chunk=chunk)
    return BlendReuse(BlendConfig(**spec), prefill_chunk=chunk)


@torch.inference_mode()
def greedy(engine: Engine, pre: Prefilled, max_tokens: int) -> list[int]:
    cache, logits, out = pre.cache.clone(), pre.last_logits, []
    pos = cache.next_position()
    for _ in range(max_tokens):
        tok = int(logits.argmax())
        if tok in engine.eos_ids:
            break
        out.append(tok)
        logits = engine.runner.forward(torch.tensor([tok]), torch.tensor([pos]), cache)
        pos += 1
    return out


def run(args) -> dict:
    engine = Engine(codec=args.codec)
    # one store per kind of chunk KV, so that head-context chunks (which are also the in-context prefix KV of a
    # document placed first) never turn a plain variant's first document into an exact prefix hit
    sources = {hc: ChunkSource.open(engine.runner, engine.lm.fingerprint, "ram:4GiB", args.codec) for hc in (0, 1)}
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
        for hc in {int(bool((VARIANTS[n] or {}).get("head_context"))) for n in names}:  # warm what is used
            NaiveReuse(BlendConfig(head_context=bool(hc))).prefill(engine.runner, plan, sources[hc])
        for name in names:
            method = method_for(name, VARIANTS[name], engine.config.prefill_chunk)
            source = sources[int(method.cfg.head_context)]
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
        for source in sources.values():  # each example starts cold; the warm-up above fills what it needs
            source.store.clear()
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
