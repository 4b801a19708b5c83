"""Prefill and decode speed of kvstash's layer-by-layer engine next to transformers' generate, one run.

    .venv/bin/python benchmarks/engine_vs_hf.py --tokens 2048 --decode 64 --repeats 3

Both run the same model weights on the same prompt ids; medians over --repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import kvstash
from kvstash.engine import Engine


def prompt_ids(engine: Engine, tokens: int) -> torch.Tensor:
    docs = sorted((Path(kvstash.__file__).parent / "demo_docs").glob("*.txt"))
    text = " ".join(p.read_text() for p in docs)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor((ids * (tokens // len(ids) + 1))[:tokens])


@torch.inference_mode()
def ours(engine: Engine, ids: torch.Tensor, decode: int) -> tuple[float, float]:
    r = engine.runner
    t = time.perf_counter()
    cache = r.new_cache(len(ids) + decode + 1)
    logits = r.prefill(cache, ids.tolist(), 0, engine.config.prefill_chunk)
    prefill = time.perf_counter() - t
    tok, pos = int(logits.argmax()), len(ids)
    t = time.perf_counter()
    for _ in range(decode):
        logits = r.forward(torch.tensor([tok]), torch.tensor([pos]), cache)
        tok, pos = int(logits.argmax()), pos + 1
    return len(ids) / prefill, decode / (time.perf_counter() - t)


@torch.inference_mode()
def hf(engine: Engine, ids: torch.Tensor, decode: int) -> tuple[float, float]:
    m = engine.lm.model
    t = time.perf_counter()
    out = m(ids[None], use_cache=True)
    prefill = time.perf_counter() - t
    past, tok = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
    t = time.perf_counter()
    for _ in range(decode):
        out = m(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
    decode_s = time.perf_counter() - t
    return len(ids) / prefill, decode / decode_s


@torch.inference_mode()
def hf_generate(engine: Engine, ids: torch.Tensor, decode: int) -> float:
    t = time.perf_counter()
    engine.lm.model.generate(ids[None], max_new_tokens=decode, min_new_tokens=decode, do_sample=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engine = Engine()
    ids = prompt_ids(engine, args.tokens)
    ours(engine, ids[:64], 4), hf(engine, ids[:64], 4)  # warm-up
    rows = {"kvstash": [], "transformers": []}
    gen_s = []
    for _ in range(args.repeats):
        rows["kvstash"].append(ours(engine, ids, args.decode))
        rows["transformers"].append(hf(engine, ids, args.decode))
        gen_s.append(hf_generate(engine, ids, args.decode))
    result = {"tokens": args.tokens, "decode": args.decode, "threads": torch.get_num_threads()}
    print(f"| engine | prefill tok/s | decode tok/s |  ({args.tokens}-token prompt, {args.decode} decoded)")
    print("|---|---|---|")
    for name, vals in rows.items():
        p = statistics.median(v[0] for v in vals)
        d = statistics.median(v[1] for v in vals)
        result[name] = {"prefill_tok_s": round(p, 1), "decode_tok_s": round(d, 2)}
        print(f"| {name} | {p:.0f} | {d:.1f} |")
    result["transformers_generate_s"] = round(statistics.median(gen_s), 2)
    print(f"transformers generate() end to end: {statistics.median(gen_s):.2f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
