"""What a blended prompt's prefill does to the steps of the scheduler while another request decodes.

    .venv/bin/python benchmarks/step_trace.py --passages 8 --budgets 512,128

A chat request decodes; then a RAG prompt (MuSiQue passages, stored in one order and asked in the reverse
order, so blend reuses every chunk) arrives with reuse ``blend``. For each ``--budgets`` value (the
scheduler's ``max_batch_tokens``) this prints every step until the prompt's first token: its wall time, the
prefill work it counted against the budget (rows x the share of the layers they ran) and the layer the
prompt's pass stopped at (0: the pass finished, or a new one begins). The decoding request gets one token per
step, so a step's seconds are its time per output token while the prompt prefills. In the serving dtype.
"""

from __future__ import annotations

import argparse
import time

from kvstash.batch.scheduler import BatchConfig, Scheduler
from kvstash.bench.datasets import load_dataset
from kvstash.engine import Engine, EngineConfig
from kvstash.model.dtype import resolve_dtype
from kvstash.prompt import Segment
from kvstash.sampling import SamplingParams


def trace(engine: Engine, segments: list[Segment], budget: int) -> dict:
    sched = Scheduler(engine, BatchConfig(max_batch=2, max_batch_tokens=budget))
    chat = engine.plan([Segment("Write a long story about a river.", "user")])
    talk = sched.add(chat, SamplingParams(max_tokens=400), engine.method("full"))
    while talk.state.value != "decode":
        sched.step()
    seq = sched.add(engine.plan(segments), SamplingParams(max_tokens=4), engine.method("blend"))
    steps, t0 = [], time.perf_counter()
    while seq.state.value in ("waiting", "prefill"):
        stats = sched.step()
        steps.append({"s": round(stats.seconds, 2), "work": round(stats.prefill_work), "layer": seq.layer})
    sched.cancel(talk)
    sched.run_until_done()
    return {"budget": budget, "ttft_s": round(time.perf_counter() - t0, 2), "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=8, help="MuSiQue passages in the prompt")
    ap.add_argument("--budgets", default="512,128", help="max_batch_tokens values, comma-separated")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ex = load_dataset("musique", n=1, passages=args.passages, seed=args.seed)[0]
    config = EngineConfig(dtype=resolve_dtype(args.dtype), store="ram:2GiB", codec="fp16")
    with Engine(config) as engine:
        engine.runner.choose_kernels()
        stored = [Segment(d) for d in ex.documents] + [Segment(ex.question, "user")]
        engine.generate(stored, SamplingParams(max_tokens=2), "blend")  # the chunks' KV, computed and stored
        asked = [Segment(d) for d in reversed(ex.documents)] + [Segment(ex.question, "user")]
        print(f"prompt: {len(engine.plan(asked))} tokens, dtype {config.dtype}")
        for budget in (int(b) for b in args.budgets.split(",")):
            print(trace(engine, asked, budget))


if __name__ == "__main__":
    main()
