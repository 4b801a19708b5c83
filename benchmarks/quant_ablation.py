"""Where 4-bit KV error comes from, and what lowers it: KIVI variants on needle prompts, one run.

    .venv/bin/python benchmarks/quant_ablation.py --n 8 --passages 6 --threads 1 --out /tmp/quant_ablation.json
    .venv/bin/python benchmarks/quant_ablation.py --per-layer --n 6 --threads 1 --out /tmp/quant_layers.json

An ablation of *accuracy only*: each variant quantizes and immediately dequantizes the prompt's K/V
(fake quantization, with the real :func:`kvstash.quant.quantize` / :func:`~kvstash.quant.dequantize`), so
bytes are not measured here (``benchmarks/compression.py`` measures the real packed cache). Layout as the
decode cache: the first ``sinks`` tokens and the newest ``R`` tokens stay exact, the rest is quantized in
whole groups of G tokens (keys per channel) and G channels (values per token). Per variant: mean
KL(full || variant) along the full-precision greedy answer (teacher-forced) and greedy answer agreement.

``--per-layer`` instead quantizes one tensor at a time (one layer's keys, or its values, at 4 bits) and
reports each tensor's answer KL next to the score :func:`kvstash.compress.bits.sensitivity` gives it (what
``--kv-alloc mixed`` allocates bits by, per KV head; here averaged over the layer's heads), with their
Spearman rank correlation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from blend_study import greedy  # this folder's scripts: run as benchmarks/quant_ablation.py

from kvstash.bench.datasets import load_dataset
from kvstash.bench.metrics import answers_agree, kl_divergence
from kvstash.cache.kivi import dequantize, quantize
from kvstash.cache.kv import KVCache
from kvstash.cache.layer import KVQuantConfig
from kvstash.compress.bits import sensitivity
from kvstash.engine import Engine, EngineConfig
from kvstash.model.rope import Rope, reposition
from kvstash.prompt import Segment
from kvstash.reuse import Prefilled

VARIANTS: dict[str, dict] = {
    "kv4 (decode-cache default: G=64, R=32, 1 sink)": {},
    "kv4 keys only": dict(values=False),
    "kv4 values only": dict(keys=False),
    "kv4 with 8-bit keys": dict(key_bits=8),
    "kv4 R=128": dict(residual=128),
    "kv4 keys G=32": dict(key_group=32),
    "kv4 4 sinks": dict(sinks=4),
    "kv4 layers 0-3 exact": dict(exact_layers=4),
    "kv4 keys pre-RoPE": dict(pre_rope=True),
    "kv4 values Hadamard-rotated": dict(hadamard_values=True),
    "kv2 (G=32)": dict(bits=2, key_group=32, value_group=32),
    "kv2 keys pre-RoPE, values Hadamard": dict(
        bits=2, key_group=32, value_group=32, pre_rope=True, hadamard_values=True
    ),  # fmt: skip
}


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix [n, n] (n a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def fake_quant(k, v, pos, rope: Rope, bits=4, key_group=64, value_group=64, residual=32, sinks=1, keys=True,
               values=True, pre_rope=False, hadamard_values=False, key_bits=None):  # fmt: skip
    """k, v: [KVH, T, D] of one layer at positions pos [T] -> (k, v) after quantize + dequantize (keys at
    ``key_bits``, default ``bits``)."""
    m = (k.shape[1] - sinks - residual) // key_group * key_group  # tokens quantized: whole key groups
    if m <= 0:
        return k, v
    part = slice(sinks, sinks + m)
    k, v = k.clone(), v.clone()
    if keys:
        x, p = k[:, part].float(), pos[part]
        if pre_rope:  # quantize the keys as they were before rotation (KVQuant)
            x = reposition(x, p, torch.zeros_like(p), rope)
        heads, _, dim = x.shape
        groups = x.reshape(heads, m // key_group, key_group, dim)  # per channel: G tokens of one channel
        x = dequantize(quantize(groups, key_bits or bits, key_group, axis=2)).reshape(heads, m, dim)
        k[:, part] = (reposition(x, torch.zeros_like(p), p, rope) if pre_rope else x).to(k.dtype)
    if values:
        x = v[:, part].float()
        rot = hadamard(x.shape[-1]) if hadamard_values else None
        x = x @ rot if rot is not None else x
        x = dequantize(quantize(x, bits, value_group, axis=2))
        v[:, part] = (x @ rot.T if rot is not None else x).to(v.dtype)
    return k, v


def quantized_copy(cache: KVCache, rope: Rope, exact_layers: int = 0, **kw) -> KVCache:
    c = cache.clone()
    for layer in range(exact_layers, c.layers):
        n = c.length
        c.k[layer, :, :n], c.v[layer, :, :n] = fake_quant(c.k[layer, :, :n], c.v[layer, :, :n], c.pos[layer, 0, :n],
                                                          rope, **kw)  # fmt: skip
    return c


def ranks(x: list[float]) -> list[int]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0] * len(x)
    for r, i in enumerate(order):
        out[i] = r
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb, n = ranks(a), ranks(b), len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def per_layer(engine: Engine, args) -> int:
    """Answer KL of quantizing one tensor at a time, next to its sensitivity score."""
    rope = engine.runner.rope
    kl: dict[str, list[float]] = {}
    score: dict[str, list[float]] = {}
    with torch.inference_mode():
        for i, ex in enumerate(load_dataset(args.dataset, n=args.n, passages=args.passages)):
            plan = engine.plan([Segment(d) for d in ex.documents] + [Segment(ex.question, "user")])
            base = engine.prefill(plan)
            full = greedy(engine, base, args.max_tokens)
            ref = engine.teacher_forced_logits(Prefilled(base.cache.clone(), base.last_logits, base.report), full)
            scores = sensitivity(engine.runner, base.cache, plan.token_ids, [KVQuantConfig.for_bits(4)])[0].mean(1)
            for layer in range(base.cache.layers):
                for j, what in enumerate(("keys", "values")):
                    c, n = base.cache.clone(), base.cache.length
                    c.k[layer, :, :n], c.v[layer, :, :n] = fake_quant(
                        c.k[layer, :, :n], c.v[layer, :, :n], c.pos[layer, 0, :n], rope, keys=j == 0, values=j == 1
                    )
                    tf = engine.teacher_forced_logits(Prefilled(c, base.last_logits, base.report), full)
                    name = f"layer {layer} {what}"
                    kl.setdefault(name, []).append(float(kl_divergence(ref[1:], tf[1:]).mean()))
                    score.setdefault(name, []).append(float(scores[layer, j]))
            print(f"{args.dataset} {i + 1}/{args.n}: {len(plan)} tokens", file=sys.stderr, flush=True)
    table = [{"tensor": t, "kl_mean": sum(kl[t]) / len(kl[t]), "sensitivity": sum(score[t]) / len(score[t])}
             for t in kl]  # fmt: skip
    table.sort(key=lambda r: -r["kl_mean"])
    rho = spearman([r["kl_mean"] for r in table], [r["sensitivity"] for r in table])
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "spearman": rho, "table": table, "kl": kl, "sensitivity": score}, f, indent=1)
    total = sum(r["kl_mean"] for r in table)
    print(f"Spearman rank correlation of sensitivity and answer KL over {len(table)} tensors: {rho:.2f}")
    print("| tensor at 4 bits | answer KL | share of the sum | sensitivity |\n|---|---|---|---|")
    for r in table[:12]:
        print(f"| {r['tensor']} | {r['kl_mean']:.2e} | {r['kl_mean'] / total:.0%} | {r['sensitivity']:.1e} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="needle")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--passages", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", type=lambda s: s.split(";"), help="variant names separated by ; (default all)")
    ap.add_argument("--out", default="quant_ablation.json")
    ap.add_argument("--per-layer", action="store_true", help="one tensor at a time, against its sensitivity score")
    args = ap.parse_args(argv)
    engine = Engine(EngineConfig(threads=args.threads))
    if args.per_layer:
        return per_layer(engine, args)
    rope = engine.runner.rope
    unknown = set(args.only or ()) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {'; '.join(VARIANTS)}")
    names = [v for v in VARIANTS if not args.only or v in args.only]
    rows: dict[str, dict[str, list]] = {v: {"kl": [], "agree": []} for v in names}
    with torch.inference_mode():
        for i, ex in enumerate(load_dataset(args.dataset, n=args.n, passages=args.passages)):
            plan = engine.plan([Segment(d) for d in ex.documents] + [Segment(ex.question, "user")])
            base = engine.prefill(plan)
            full = greedy(engine, base, args.max_tokens)
            full_text = engine.tokenizer.decode(full, skip_special_tokens=True)
            ref = engine.teacher_forced_logits(Prefilled(base.cache.clone(), base.last_logits, base.report), full)
            for name in names:
                pre = Prefilled(quantized_copy(base.cache, rope, **VARIANTS[name]), base.last_logits, base.report)
                text = engine.tokenizer.decode(greedy(engine, pre, args.max_tokens), skip_special_tokens=True)
                tf = engine.teacher_forced_logits(pre, full)
                rows[name]["kl"].append(float(kl_divergence(ref[1:], tf[1:]).mean()))
                rows[name]["agree"].append(answers_agree(text, full_text))
            print(f"{args.dataset} {i + 1}/{args.n}: {len(plan)} tokens", file=sys.stderr, flush=True)
    table = [{"variant": v, "n": len(r["kl"]), "kl_mean": sum(r["kl"]) / len(r["kl"]),
              "agree": sum(r["agree"])} for v, r in rows.items()]  # fmt: skip
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "table": table, "rows": rows}, f, indent=1)
    print("| variant | answer KL | agreement |\n|---|---|---|")
    for t in table:
        print(f"| {t['variant']} | {t['kl_mean']:.4f} | {t['agree']}/{t['n']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
