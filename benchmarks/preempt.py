"""Preempting a sequence to stay in the KV budget: recompute its KV later, or swap it out to a file and back?

    .venv/bin/python benchmarks/preempt.py --passages 7 --generated 64

For a RAG prompt (MuSiQue passages in a warm store) with ``--generated`` answer tokens, in the serving dtype:

- recompute: the prompt through the reuse method (blend or full) again, then the answer so far in one plain
  pass -- what the scheduler does with ``--preempt recompute`` or a cache it cannot swap;
- swap: the scheduler's own :class:`kvstash.batch.swap.SwapSpace` (the default): the cache written to a
  safetensors file in a temporary directory, read back into a fresh cache, the file removed. On a CPU the KV
  lives in the same RAM as everything else, so only a swap to a file frees memory.

Medians of ``--repeats`` runs (after one warm-up), 2 threads.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from kvstash.batch.swap import SwapSpace
from kvstash.bench.datasets import load_dataset
from kvstash.engine import Engine, EngineConfig
from kvstash.model.dtype import resolve_dtype
from kvstash.prompt import Segment


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=7)
    ap.add_argument("--generated", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="auto: bf16 where the CPU has it natively, else fp32")
    args = ap.parse_args()
    args.dtype = resolve_dtype(args.dtype)
    torch.set_num_threads(2)
    engine = Engine(EngineConfig(dtype=args.dtype, store="ram:4GiB"))
    ex = load_dataset("musique", n=1, passages=10, seed=0)[0]
    plan = engine.plan([Segment(d) for d in ex.documents[: args.passages]] + [Segment(ex.question, "user")])
    answer = list(engine.tokenizer(" ".join(ex.documents))["input_ids"][: args.generated])
    n = len(plan)

    def recompute(reuse: str):
        def run():
            pre = engine.prefill(plan, reuse)
            engine.runner.prefill(pre.cache, answer, n, 512)
            return pre

        return run

    whole = recompute("full")()
    rows = {f"recompute ({reuse})": timed(recompute(reuse), args.repeats) for reuse in ("blend", "full")}
    cache = whole.cache
    with tempfile.TemporaryDirectory() as root:
        space = SwapSpace(root)

        def swap() -> None:
            back = space.load(space.save("seq", cache), engine.runner, room=64)
            assert back is not None and back.length == cache.length

        rows["swap to a file and back"] = timed(swap, args.repeats)
    mib = cache.nbytes / 2**20
    print(f"prompt {n} tokens + {len(answer)} generated, {args.dtype}, KV {mib:.0f} MiB")
    print("| way back | seconds |\n|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {s:.3f} |")


if __name__ == "__main__":
    main()
