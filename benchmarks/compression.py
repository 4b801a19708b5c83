"""KV compression: bytes per token, answer quality and decode speed of quantized and evicted decode caches.

    .venv/bin/python benchmarks/compression.py --n 20 --passages 6 --threads 1 --out /tmp/compression.json

For needle and musique prompts (~3-4K tokens), each example is prefilled once in full precision; every
setting compresses its own copy of that cache (evict, then quantize, as ``kvstash.compress.Compression``;
one eviction scoring per policy and example is shared by its budgets),
then decodes greedily and teacher-forces the full-precision answer. Per setting:

- bytes: the K/V bytes the compressed cache holds over an fp16 cache of the whole prompt (1.0 = fp16;
  the uncompressed engine cache is fp32 = 2.0). Eviction rows keep the kept tokens in fp16 (``kv_bits=16``).
- accuracy: the answer contains a gold answer; agreement: equal to the full-precision answer (normalized);
- KL: mean KL(full || compressed) of the next-token distributions along the full answer (teacher forcing,
  from the second answer token on: the first comes from the prefill's logits, the same for every setting);
- decode tok/s: median over examples, greedy, measured in the same process as the full-precision baseline.

Store codecs (``--codec``) are reported by their exact encoded size at the examples' chunk shapes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvstash.bench.datasets import load_dataset
from kvstash.bench.metrics import answers_agree, contains_gold, kl_divergence
from kvstash.cache.quantized import quantize_cache
from kvstash.compress.bits import allocate_head_bits
from kvstash.compress.evict import parse_evict
from kvstash.engine import Engine, EngineConfig
from kvstash.prompt import Segment
from kvstash.reuse import Prefilled
from kvstash.sampling import SamplingParams
from kvstash.store.codec_registry import get_codec

BITS = (16, 8, 4, 2)
POLICIES = ("snapkv", "streaming", "h2o")
BUDGETS = (0.5, 0.25, 0.1)
CODECS = ("fp16", "kivi8", "kivi4", "kivi2")


@dataclass(frozen=True)
class Setting:
    name: str
    kv_bits: int | None = None
    evict: str | None = None  # policy:budget
    kv_alloc: str | None = None  # "mixed": per-KV-head key/value widths (kvstash.compress.bits)


SETTINGS = [
    Setting("full fp32"),
    *(Setting(f"kv{b}", kv_bits=b) for b in BITS),
    Setting("kv4 mixed", kv_bits=4, kv_alloc="mixed"),
    *(Setting(f"{p}:{b}", kv_bits=16, evict=f"{p}:{b}") for p in POLICIES for b in BUDGETS),
]


def greedy(engine: Engine, pre: Prefilled, max_tokens: int) -> tuple[list[int], float]:
    """Greedy decoding from a prefilled cache with the engine's decode loop; returns (ids, decode tok/s)."""
    res = engine.decode(pre, SamplingParams(max_tokens=max_tokens))
    return res.token_ids, res.decode_tok_s


def compressed(engine: Engine, base: Prefilled, plan, s: Setting, scores: dict) -> tuple[Prefilled, float]:
    """A copy of ``base`` compressed as ``s``, and the seconds that took. Eviction scores are computed once
    per policy and example (``scores``: name -> (scores, seconds)) and their time is counted in every row."""
    t = time.perf_counter()
    cache, score_s, head_bits = base.cache.clone(), 0.0, None
    if s.kv_alloc:  # measured on the cache as prefilled, as kvstash.compress.pipeline.Compression does
        head_bits = allocate_head_bits(engine.runner, cache, plan.token_ids, s.kv_bits)
    if s.evict:
        policy = parse_evict(s.evict)
        if policy.name not in scores:
            t1 = time.perf_counter()
            scores[policy.name] = policy.score(engine.runner, cache, plan.token_ids), time.perf_counter() - t1
            t += scores[policy.name][1]  # added back once below, as for every budget
        policy.apply(engine.runner, cache, plan.token_ids, scores=scores[policy.name][0])
        score_s = scores[policy.name][1]
    if s.kv_bits:
        cache = quantize_cache(cache, s.kv_bits, head_bits)
    return Prefilled(cache, base.last_logits, base.report), time.perf_counter() - t + score_s


def _plan(engine: Engine, ex):
    return engine.plan([Segment(d) for d in ex.documents] + [Segment(ex.question, "user")])


def run_example(engine: Engine, ex, max_tokens: int, settings: list[Setting]) -> dict:
    """Every setting on one example: {"id", "prompt_tokens", "prefill_s", "settings": {name: metrics}}."""
    plan = _plan(engine, ex)
    n = len(plan)
    t = time.perf_counter()
    base = engine.prefill(plan)
    prefill_s = time.perf_counter() - t
    fp16_bytes = base.cache.nbytes * 2 // base.cache.k.element_size()
    scores: dict = {}
    full_ids: list[int] = []
    full_text, ref = "", None
    out = {"id": ex.id, "prompt_tokens": n, "prefill_s": round(prefill_s, 2), "settings": {}}
    for s in settings:  # the first is full precision: the reference of the others
        pre, compress_s = compressed(engine, base, plan, s, scores)
        kv_bytes = pre.cache.nbytes
        ids, tok_s = greedy(engine, pre, max_tokens)
        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        if ref is None:
            full_ids, full_text = ids, text
            ref = engine.teacher_forced_logits(Prefilled(base.cache.clone(), base.last_logits, base.report), ids)
        kl = None
        if s is not settings[0] and len(full_ids) > 1:  # the full row would be compared with itself
            tf = engine.teacher_forced_logits(compressed(engine, base, plan, s, scores)[0], full_ids)
            kl = float(kl_divergence(ref[1:], tf[1:]).mean())
        out["settings"][s.name] = {
            "answer": text,
            "kv_bytes": kv_bytes,
            "bytes_ratio": kv_bytes / fp16_bytes,
            "correct": contains_gold(text, ex.answers),
            "agree": answers_agree(text, full_text),
            "kl": kl,
            "tok_s": tok_s,
            "compress_s": compress_s,
        }
    return out


def codec_ratios(engine: Engine, examples) -> dict[str, float]:
    """Encoded bytes of every document chunk over their fp16 bytes, per store codec (exact sizes)."""
    r = engine.runner
    lengths = [len(s.token_ids) for ex in examples for s in _plan(engine, ex).segments
               if s.kind == "document"]  # fmt: skip
    shapes = [(r.num_layers, r.kv_heads, t, r.head_dim) for t in lengths]
    fp16 = sum(2 * 2 * t * r.num_layers * r.kv_heads * r.head_dim for t in lengths)
    return {c: sum(get_codec(c).encoded_nbytes(s) for s in shapes) / fp16 for c in CODECS}


def summarize(examples: list[dict], settings: list[Setting]) -> list[dict]:
    """One row per setting over the examples' records."""

    def col(name: str, key: str) -> list:
        return [e["settings"][name][key] for e in examples if e["settings"][name][key] is not None]

    def pct(xs: list) -> float:
        return round(100 * sum(xs) / len(xs), 1)

    return [
        {
            "setting": s.name,
            "bytes_vs_fp16": round(statistics.mean(col(s.name, "bytes_ratio")), 3),
            "accuracy_pct": pct(col(s.name, "correct")),
            "agreement_pct": pct(col(s.name, "agree")),
            "kl_mean": round(statistics.mean(col(s.name, "kl")), 4) if col(s.name, "kl") else None,
            "decode_tok_s": round(statistics.median(col(s.name, "tok_s")), 1),
            "compress_s": round(statistics.median(col(s.name, "compress_s")), 2),
        }
        for s in settings
    ]


def print_table(dataset: str, table: list[dict], full_tok_s: float) -> None:
    print(f"\n{dataset}")
    print("| setting | bytes vs fp16 | accuracy % | agreement % | answer KL | decode tok/s (x full) | compress s |")
    print("|---|---|---|---|---|---|---|")
    for t in table:
        speed = f"{t['decode_tok_s']} ({t['decode_tok_s'] / full_tok_s:.2f}x)" if full_tok_s else "-"
        kl = "-" if t["kl_mean"] is None else f"{t['kl_mean']:.4f}"
        print(f"| {t['setting']} | {t['bytes_vs_fp16']:.3f} | {t['accuracy_pct']} | {t['agreement_pct']} | {kl} | "
              f"{speed} | {t['compress_s']} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="needle,musique")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--passages", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0, help="which examples (needle: which passages and codes)")
    ap.add_argument("--max-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="compression.json")
    ap.add_argument("--resume", action="store_true", help="keep the examples --out already holds, run the rest")
    ap.add_argument("--only", help="comma-separated setting names to run (full fp32 always runs); default all")
    args = ap.parse_args(argv)
    settings = SETTINGS
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in SETTINGS}
        if unknown:
            ap.error(f"unknown settings {sorted(unknown)}; known: {', '.join(s.name for s in SETTINGS)}")
        settings = [SETTINGS[0], *(s for s in SETTINGS[1:] if s.name in wanted)]
    torch.manual_seed(0)
    engine = Engine(EngineConfig(threads=args.threads))
    result = {"args": vars(args), "datasets": {}}
    if args.resume and Path(args.out).is_file():
        result["datasets"] = json.loads(Path(args.out).read_text())["datasets"]
    for name in args.datasets.split(","):
        examples = load_dataset(name, n=args.n, passages=args.passages, seed=args.seed)
        done = {e["id"]: e for e in result["datasets"].get(name, {}).get("examples", [])}
        per_example = []
        for i, ex in enumerate(examples):
            t = time.perf_counter()
            per_example.append(done.get(ex.id) or run_example(engine, ex, args.max_tokens, settings))
            e = per_example[-1]
            print(f"{name} {i + 1}/{len(examples)}: {e['prompt_tokens']} tokens, prefill {e['prefill_s']} s, "
                  f"all settings {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
            result["datasets"][name] = {
                "done": i + 1,
                "table": summarize(per_example, settings),
                "examples": per_example,
            }
            with open(args.out, "w") as f:  # after every example: a long run can be read, or resumed
                json.dump(result, f, indent=1)
        table = summarize(per_example, settings)
        codecs = codec_ratios(engine, examples)
        prompt_tokens = statistics.mean(e["prompt_tokens"] for e in per_example)
        result["datasets"][name].update(codecs=codecs, mean_prompt_tokens=prompt_tokens)
        print_table(
            f"{name} (n={len(examples)}, mean prompt {prompt_tokens:.0f} tokens)", table, table[0]["decode_tok_s"]
        )
        print("store codecs, bytes vs fp16: " + ", ".join(f"{c} {r:.3f}" for c, r in codecs.items()))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
