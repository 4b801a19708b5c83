"""Reuse methods against full prefill on needle prompts, for tuning on one set and reporting on another.

    .venv/bin/python benchmarks/blend_eval.py --dataset needle-code --seed 2 --n 50 --passages 8 \\
        --methods blend:0.15 blend:auto cacheblend:0.15 naive --out out/blend-eval

    # the same needles hidden in SQuAD paragraphs (24 paragraphs: 2-5K tokens)
    .venv/bin/python benchmarks/blend_eval.py --dataset needle-code --haystack squad --seed 2 --n 50 \\
        --passages 24 --methods blend:0.15 blend:auto

A method is a ``--reuse`` spec, optionally with BlendConfig fields after slashes: ``blend:0.1/probe_layers=8``,
``blend:auto/auto=0.25``. Passages are in a seeded random order and their chunk KV is in the RAM store, stored
standalone. For every prompt, full prefill is the reference: its greedy answer and its next-token
distributions along that answer (teacher-forced). Each method is then measured on the same prompt: prefill
time (TTFT; the median of ``--repeat`` runs, full's too), the share of the prompt recomputed and blend's
ratio, the needle found (the code in the greedy answer) and full's needles kept, agreement with full's answer,
and the mean KL(full || method) over full's answer tokens. Full's needles are also split by how firmly full
chose its answer (its smallest logit margin up to the code): the table's "clear needles" are those at least
``CLEAR`` logits from a tie, the ones a method should keep; the rest hang on near ties that a small perturbation of
the KV may flip (``benchmarks/needle_margin.py``). Results: ``OUT/NAME.json`` (per prompt and summary) and a
markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from kvstash.bench.datasets import Example, load_dataset
from kvstash.bench.metrics import answers_agree, contains_gold, kl_divergence, logit_margins
from kvstash.engine import Engine
from kvstash.prompt import PromptPlan, Segment
from kvstash.reuse.base import Prefilled
from kvstash.reuse.full import FullPrefill
from kvstash.reuse.partial import NaiveReuse
from kvstash.reuse.registry import make_method
from kvstash.reuse.source import ChunkSource
from kvstash.sampling import SamplingParams

CLEAR = 1.0  # logits: a needle of full's whose answer never came closer than this to a tie is a clear one


def parse_method(spec: str, chunk: int):
    """``blend:0.1/probe_layers=8/focus=recent`` -> a reuse method (fields are BlendConfig's; numbers, words or
    None)."""
    name, *fields = spec.split("/")
    opts = {}
    for f in fields:
        key, _, value = f.partition("=")
        if not value:
            raise SystemExit(f"method {spec!r}: write options as /field=value, e.g. blend:0.1/probe_layers=8")
        opts[key] = None if value == "None" else _number(value)
    return make_method(name, chunk, **opts)


def _number(value: str):
    """An option's value: an int, a float, or the word itself (``focus=recent``)."""
    if value.lstrip("-").isdigit():
        return int(value)
    try:
        return float(value)
    except ValueError:
        return value


def greedy(engine: Engine, pre, max_tokens: int) -> list[int]:
    """Greedy answer ids after a prefill, leaving ``pre.cache`` as it was (it is scored teacher-forced next)."""
    return engine.decode(replace(pre, cache=pre.cache.clone()), SamplingParams(max_tokens=max_tokens)).token_ids


def code_end(engine: Engine, ids: list[int], answers: list[str]) -> int:
    """Tokens of the answer up to the one that completes the gold (all of them if it holds none)."""
    for t in range(1, len(ids) + 1):
        if contains_gold(engine.tokenizer.decode(ids[:t], skip_special_tokens=True), answers):
            return t
    return len(ids)


def timed(fn, repeat: int):
    """(median seconds over ``repeat`` runs, the last run's result)."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


@dataclass
class Case:
    """One prompt as a study's per-prompt method sees it, once full prefill has run: ``ref`` is full's prefill, its
    cache extended by full's greedy ``answer`` (all but its last token, teacher-forced); ``naive`` is naive reuse's
    prefill (every stored chunk's standalone KV laid out at its place); ``source`` holds every chunk's KV."""

    engine: Engine
    example: Example
    plan: PromptPlan
    ref: Prefilled
    answer: list[int]
    naive: Prefilled
    source: ChunkSource


def run(args, per_prompt: dict | None = None) -> dict:
    """Every method on every prompt; ``per_prompt`` adds methods built for each prompt, name -> ``fn(case)``
    (a study's oracle that knows where the needle is, or reads full prefill's KV: :class:`Case`)."""
    engine = Engine(dtype=args.dtype, threads=args.threads)
    source = ChunkSource.open(engine.runner, engine.lm.fingerprint, "ram:8GiB", args.codec)
    opts = {"haystack": args.haystack} if args.haystack else {}
    examples = load_dataset(args.dataset, n=args.n, passages=args.passages, seed=args.seed, **opts)
    chunk = engine.config.prefill_chunk
    methods = {spec: parse_method(spec, chunk) for spec in args.methods}
    per_prompt = per_prompt or {}
    rows: dict[str, list[dict]] = {"full": [], **{m: [] for m in [*methods, *per_prompt]}}
    for ex in tqdm(examples, desc=f"{args.dataset} seed {args.seed}"):
        plan = engine.plan([Segment(d) for d in ex.documents] + [Segment(ex.question, "user")])
        full_s, ref = timed(lambda p=plan: FullPrefill(chunk).prefill(engine.runner, p), args.repeat)
        ref_ids = greedy(engine, ref, args.max_tokens)
        ref_text = engine.tokenizer.decode(ref_ids, skip_special_tokens=True)
        ref_logits = engine.teacher_forced_logits(ref, ref_ids)
        found = contains_gold(ref_text, ex.answers)
        margin = float(logit_margins(ref_logits, ref_ids)[: code_end(engine, ref_ids, ex.answers)].min())
        base = dict(id=ex.id, tokens=len(plan), full_s=full_s)
        full = dict(base, ttft=full_s, text=ref_text, found=found, agree=True, kl=0.0, recomputed=1.0, margin=margin)
        rows["full"].append(full)
        naive = NaiveReuse().prefill(engine.runner, plan, source)  # warm: every chunk in the store
        case = Case(engine, ex, plan, ref, ref_ids, naive, source)
        built = {name: fn(case) for name, fn in per_prompt.items()}
        for spec, method in {**methods, **built}.items():
            ttft, pre = timed(lambda m=method, p=plan: m.prefill(engine.runner, p, source), args.repeat)
            ids = greedy(engine, pre, args.max_tokens)
            text = engine.tokenizer.decode(ids, skip_special_tokens=True)
            kl = kl_divergence(ref_logits, engine.teacher_forced_logits(pre, ref_ids)).mean().item()
            rows[spec].append(
                dict(
                    base,
                    ttft=ttft,
                    text=text,
                    found=contains_gold(text, ex.answers),
                    agree=answers_agree(text, ref_text),
                    kl=kl,
                    recomputed=pre.report.recomputed_ratio,
                    ratio=pre.report.blend_ratio,
                )
            )
        source.store.clear()  # each prompt starts cold; the warm-up above fills what it needs
        if args.out:
            write(args, rows, partial=True)
    return write(args, rows)


def summarize(rows: dict[str, list[dict]]) -> list[dict]:
    """Per method. ``kept``: of full's ``of`` needles, those it finds too; ``clear_kept``: of full's needles
    whose decisive margin (the smallest logit margin of full's answer up to the code,
    ``benchmarks/needle_margin.py``) is at least ``CLEAR`` logits, those it finds too; full's other needles
    hang on near ties. A method's rows may be one short of full's in a partial write."""
    full_found = sum(r["found"] for r in rows["full"])
    hits = [i for i, r in enumerate(rows["full"]) if r["found"]]
    clear = [i for i, r in enumerate(rows["full"]) if r["found"] and r["margin"] >= CLEAR]
    table = []
    for name, rs in rows.items():
        speedups = sorted(r["full_s"] / r["ttft"] for r in rs)
        found = sum(r["found"] for r in rs)
        ratios = [r["ratio"] for r in rs if r.get("ratio") is not None]
        table.append(
            dict(
                method=name,
                n=len(rs),
                found=found,
                found_vs_full=found / max(1, full_found),
                kept=sum(rs[i]["found"] for i in hits if i < len(rs)),
                of=len(hits),
                clear_kept=sum(rs[i]["found"] for i in clear if i < len(rs)),
                clear=len(clear),
                agree=sum(r["agree"] for r in rs),
                kl=statistics.mean(r["kl"] for r in rs),
                recomputed=statistics.mean(r["recomputed"] for r in rs),
                ratio_mean=statistics.mean(ratios) if ratios else None,
                ratio_min=min(ratios) if ratios else None,
                ratio_max=max(ratios) if ratios else None,
                tokens_median=statistics.median(r["tokens"] for r in rs),
                ttft_s=statistics.median(r["ttft"] for r in rs),
                speedup_median=statistics.median(speedups),
                speedup_p10=speedups[len(speedups) // 10],
            )
        )
    return table


def write(args, rows: dict[str, list[dict]], partial: bool = False) -> dict:
    return save(args, {"config": vars(args), "summary": summarize(rows), "rows": rows}, partial)


def save(args, result: dict, partial: bool = False) -> dict:
    """``result`` as ``OUT/DATASET[-HAYSTACK]-sSEED[.partial].json`` (a study on the same prompts may share it)."""
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.dataset}{'-' + args.haystack if args.haystack else ''}-s{args.seed}"
    (args.out / f"{name}{'.partial' if partial else ''}.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def parser(doc: str = __doc__) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="needle-code")
    ap.add_argument("--haystack", help="needle datasets: musique (default), wikimqa or squad passages")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--passages", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=["blend:0.15", "cacheblend:0.15", "naive"])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1, help="timed prefills per method and prompt (median kept)")
    ap.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="auto: bf16 where the CPU has it"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--codec", default="fp16")
    ap.add_argument("--out", type=Path, default=Path("out/blend-eval"))
    return ap


def print_table(args, result: dict) -> None:
    print(f"{args.dataset} {args.haystack or ''} seed {args.seed}: {args.n} prompts, {args.passages} passages")
    print(
        "| method | needle found | vs full | full's needles kept | full's clear needles kept | agree w/ full "
        "| mean answer KL | recomputed | ratio (min-max) | TTFT s | speedup (median, p10) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["summary"]:
        ratio = "" if r["ratio_mean"] is None else f"{r['ratio_mean']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
        print(
            f"| {r['method']} | {r['found']}/{r['n']} | {r['found_vs_full']:.0%} | {r['kept']}/{r['of']} | "
            f"{r['clear_kept']}/{r['clear']} | {r['agree']}/{r['n']} | {r['kl']:.3f} | {r['recomputed']:.1%} | "
            f"{ratio} | {r['ttft_s']:.2f} | "
            f"{r['speedup_median']:.2f}x, {r['speedup_p10']:.2f}x |"
        )


def main() -> None:
    args = parser().parse_args()
    print_table(args, run(args))


if __name__ == "__main__":
    main()
