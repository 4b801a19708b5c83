"""Blend's time to first token with its chunk KV in RAM, on disk (warm and cold page cache) and in Redis, with
whole-chunk loading and with layer-wise pipelined loading, next to full prefill, in one run.

    .venv/bin/python benchmarks/blend_tiers.py --n 6 --passages 8 --repeat 3

Every prompt's chunks are stored (fp16) in a RAM tier, a disk tier and a redis-server started on a free
loopback port. ``disk-cold`` drops every record file from the page cache (posix_fadvise) before each run, so
the reads go to the device. Each (tier, loading) pair is timed ``--repeat`` times per prompt; the table shows
the medians over prompts of the per-prompt medians, and each row's TTFT relative to blend from RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from kvstash.bench.datasets import load_dataset
from kvstash.engine import Engine
from kvstash.prompt import Segment
from kvstash.reuse.full import FullPrefill
from kvstash.reuse.registry import make_method
from kvstash.reuse.source import ChunkSource
from kvstash.store import StoreConfig, open_store

TIERS = ("ram", "disk", "disk-cold", "redis")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start (is it installed? make setup installs it)")


def drop_page_cache(root: Path) -> None:
    for path in root.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(args) -> dict:
    engine = Engine(dtype=args.dtype, threads=args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="kvstash-tiers-"))
    redis = start_redis(port := free_port())
    specs = {"ram": "ram:8GiB", "disk": f"disk:{tmp}:8GiB", "redis": f"redis://127.0.0.1:{port}/0"}
    stores = {t: open_store(spec, StoreConfig(engine.lm.fingerprint, args.codec)) for t, spec in specs.items()}
    stores["disk-cold"] = stores["disk"]
    sources = {(t, lay): ChunkSource(engine.runner, stores[t], layered=lay) for t in TIERS for lay in (False, True)}
    method = make_method(args.method, engine.config.prefill_chunk)
    examples = load_dataset("needle-code", n=args.n, passages=args.passages, seed=args.seed)
    rows = []
    try:
        for ex in tqdm(examples, desc="prompts"):
            plan = engine.plan([Segment(d) for d in ex.documents] + [Segment(ex.question, "user")])
            for t in ("ram", "disk", "redis"):
                method.prefill(engine.runner, plan, sources[(t, False)])  # stores every chunk in that tier
            row = {"tokens": len(plan), "full": _median(lambda p=plan: FullPrefill().prefill(engine.runner, p), args)}
            for (tier, layered), source in sources.items():
                before = (lambda: drop_page_cache(tmp)) if tier == "disk-cold" else None
                row[f"{tier}{'+layers' if layered else ''}"] = _median(
                    lambda s=source, p=plan: method.prefill(engine.runner, p, s), args, before
                )
            rows.append(row)
            for t in ("ram", "disk", "redis"):
                sources[(t, False)].store.clear()
    finally:
        for t in specs:
            stores[t].close()
        redis.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"config": vars(args), "rows": rows, "summary": summarize(rows)}


def _median(fn, args, before=None) -> float:
    times = []
    for _ in range(args.repeat):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def summarize(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "tokens"]
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    ram = statistics.median(r["ram"] for r in rows)
    return {
        "tokens": statistics.median(r["tokens"] for r in rows),
        "ttft_s": med,
        "vs_ram": {k: statistics.median(r[k] / r["ram"] for r in rows) for k in keys},
        "speedup_vs_full": {k: statistics.median(r["full"] / r[k] for r in rows) for k in keys},
        "ram_s": ram,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--passages", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="blend", help="reuse spec to time (default: blend)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="auto: bf16 where the CPU has it"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--codec", default="fp16")
    ap.add_argument("--out", type=Path, default=Path("out/blend-tiers.json"))
    args = ap.parse_args()
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    s = result["summary"]
    print(f"{args.method}, median prompt {s['tokens']:.0f} tokens, {args.n} prompts x {args.repeat} runs")
    print("| chunks from | loading | TTFT s (median) | vs blend from RAM | speedup vs full prefill |")
    print("|---|---|---|---|---|")
    for k, v in s["ttft_s"].items():
        tier, _, layers = k.partition("+")
        loading = "" if k == "full" else ("layer-wise pipelined" if layers else "whole chunks")
        name = "full prefill" if k == "full" else tier
        print(f"| {name} | {loading} | {v:.3f} | {s['vs_ram'][k]:.2f}x | {s['speedup_vs_full'][k]:.2f}x |")


if __name__ == "__main__":
    main()
