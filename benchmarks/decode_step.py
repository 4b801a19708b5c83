"""What batching can buy on this CPU: one decoding step of 1 and of B sequences, and its linear layers alone.

    .venv/bin/python benchmarks/decode_step.py --lengths 100,1000,3000 --batch 8

For each cache length, B caches of about that many tokens are prefilled; then one decoding step (a token per
sequence through ``Runner.run`` and the LM head, the cache rolled back after) is timed for 1 sequence and for
B together, and so are the same linear layers alone (every layer's projections and MLP, then the head, on 1 and
B random rows, weights streamed from memory as in a step). Medians of ``--repeat`` runs, the two sizes
interleaved. The ratio ``linear(B) / linear(1)`` bounds batching: even with no attention and no overhead, B
sequences decode at most ``B / ratio`` times faster together than one at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvstash.engine import Engine, EngineConfig
from kvstash.model.dtype import resolve_dtype
from kvstash.model.runner import Rows


def _median_s(fn, repeat: int) -> float:
    """Seconds per call of ``fn``: the median of ``repeat`` timed calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _ms(fn, repeat: int) -> float:
    return round(_median_s(fn, repeat) * 1e3, 1)


def _step(runner, caches):
    def run():
        rows = [Rows(torch.tensor([5]), torch.tensor([c.length]), c) for c in caches]
        runner.logits(torch.cat(runner.run(rows)))
        for c in caches:
            c.length -= 1  # the appended slot rolled back: every run sees the same caches

    return run


def _linear(runner, rows: int, hidden: int):
    x = torch.randn(rows, hidden, dtype=runner.dtype)

    @torch.inference_mode()
    def run():
        for p in runner.projections():
            q, _, _ = p.qkv(x)
            p.out(q.contiguous())
            p.mlp(x)
        runner.head()(x)

    return run


def measure(engine: Engine, length: int, batch: int, repeat: int) -> dict:
    runner = engine.runner
    caches = []
    for i in range(batch):
        cache = runner.new_cache(length + 64)
        runner.prefill(cache, torch.randint(100, 1000, (length + 7 * i,)), 0, 512)  # lengths a little apart
        caches.append(cache)
    hidden = engine.lm.config.hidden_size
    one, many = {"step": [], "linear": []}, {"step": [], "linear": []}
    for _ in range(2):  # interleaved: the machine's noise hits both sizes alike
        one["step"].append(_ms(_step(runner, caches[:1]), repeat))
        many["step"].append(_ms(_step(runner, caches), repeat))
        one["linear"].append(_ms(_linear(runner, 1, hidden), repeat))
        many["linear"].append(_ms(_linear(runner, batch, hidden), repeat))
    row = {"cache_tokens": length, "batch": batch}
    for key in ("step", "linear"):
        a, b = min(one[key]), min(many[key])
        row |= {f"{key}_1_ms": a, f"{key}_{batch}_ms": b, f"{key}_ratio": round(b / a, 2)}
    row["batching_bound"] = round(batch / row["linear_ratio"], 2)  # speed-up if only the linear layers cost
    row["batching_now"] = round(batch / row["step_ratio"], 2)  # tokens/s together over one at a time, per step
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="100,1000,3000", help="cache lengths in tokens, comma-separated")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoding together")
    ap.add_argument("--repeat", type=int, default=11, help="timed runs per median")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    if args.batch < 2 or args.repeat < 1:
        ap.error("--batch must be >= 2 and --repeat >= 1")
    dtype = resolve_dtype(args.dtype)
    with Engine(EngineConfig(dtype=dtype)) as engine:
        engine.runner.choose_kernels()
        rows = []
        for length in (int(x) for x in args.lengths.split(",")):
            rows.append(measure(engine, length, args.batch, args.repeat))
            print(json.dumps(rows[-1]), flush=True)
    print(f"dtype {dtype}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"dtype": dtype, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
