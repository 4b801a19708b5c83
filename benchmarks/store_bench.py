"""Chunk store: time to load a chunk's KV from each tier next to the time to recompute it, in one run.

    .venv/bin/python benchmarks/store_bench.py --sizes 512 2048 --codecs fp16 kivi4 kivi2 --repeats 5 \\
        --out /tmp/store_bench.json

Chunks are real text: musique passages run together and split with kvstash.chunking at each size (the
first chunk, cut at a sentence end).
Recompute is ``ChunkSource.compute`` (what a miss costs: the chunk's standalone prefill). A load is
``TieredStore.fetch`` from a store of that one tier: read, checksum, decode to the compute dtype.
``disk`` reads warm page-cache pages; ``disk-cold`` drops the file from the page cache first
(posix_fadvise), so it reads the device. ``redis`` is a redis-server started on a free loopback port
(or --redis URL). Medians over --repeats after one warm-up round; rounds interleave recompute and loads so
background load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis
import torch

from kvstash.bench.datasets import load_dataset
from kvstash.engine import Engine
from kvstash.splitting import document_chunks
from kvstash.store import StoreConfig, TieredStore, encode_record, open_store
from kvstash.store.disk import SUFFIX

TIERS = ("ram", "disk", "disk-cold", "redis")


@contextlib.contextmanager
def local_redis() -> Iterator[str]:
    """A throwaway redis-server (no persistence) on a free loopback port; yields its URL."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tempfile.mkdtemp(prefix="kvstash-bench-redis-")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", work]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(500):
            with contextlib.suppress(redis.ConnectionError):
                client.ping()
                break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"redis-server on port {port} did not start")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def make_chunks(engine: Engine, sizes: list[int]) -> dict[int, tuple[int, ...]]:
    """Per size, the token ids (as a document segment) of the first chunk of real text."""
    passages = [d for ex in load_dataset("musique", n=20, passages=10) for d in ex.documents]
    text = " ".join(passages)  # one running text (passages are ~600 tokens), so chunks fill up to the size
    return {size: engine.builder.tokenize(document_chunks(engine.builder, text, size)[0], "document") for size in sizes}


def open_tier(tier: str, codec: str, config: StoreConfig, root: Path, redis_url: str) -> TieredStore:
    if tier == "ram":
        return open_store("ram:4GiB", config)
    if tier in ("disk", "disk-cold"):
        return open_store(f"disk:{root / codec}", config)  # both read the same files
    return open_store(f"{redis_url}?prefix=kvstash-bench-{codec}:", config)


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn) -> float:
    t = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t
    assert out is not None, "a stored chunk was not found"
    return elapsed


def run(engine: Engine, args, root: Path, redis_url: str) -> list[dict]:
    chunks = make_chunks(engine, args.sizes)
    source = engine.chunks
    computed = {size: source.compute(ids) for size, ids in chunks.items()}
    fp = engine.lm.fingerprint
    stores = {(c, t): open_tier(t, c, StoreConfig(fp, c), root, redis_url) for c in args.codecs for t in TIERS}
    for (_, tier), store in stores.items():
        for size, ids in chunks.items():
            assert store.put(store.key(ids), computed[size]), f"{tier} did not store the {size}-token chunk"
    record_bytes = {
        (size, codec): len(encode_record(StoreConfig(fp, codec).key(ids), fp, codec, computed[size]))
        for size, ids in chunks.items()
        for codec in args.codecs
    }
    recompute: dict[int, list[float]] = {s: [] for s in chunks}
    load: dict[tuple[int, str, str], list[float]] = {(s, c, t): [] for s in chunks for c, t in stores}
    for rnd in range(args.repeats + 1):  # round 0 is the warm-up
        for size, ids in chunks.items():
            r = timed(lambda ids=ids: source.compute(ids))
            for (codec, tier), store in stores.items():
                key = store.key(ids)
                if tier == "disk-cold":
                    drop_page_cache(store.tiers[0].root / f"{key}{SUFFIX}")
                elapsed = timed(lambda store=store, key=key, ids=ids: store.get(key, ids))
                if rnd:
                    load[size, codec, tier].append(elapsed)
            if rnd:
                recompute[size].append(r)
        print(f"round {rnd}/{args.repeats} done", flush=True)
    for store in stores.values():
        store.clear()
        store.close()
    rows = []
    for size, ids in chunks.items():
        rec = statistics.median(recompute[size])
        for codec in args.codecs:
            row = {"chunk_tokens": len(ids), "size": size, "codec": codec, "recompute_ms": rec * 1e3}
            row["bytes_per_token"] = record_bytes[size, codec] / len(ids)
            for tier in TIERS:
                ms = statistics.median(load[size, codec, tier]) * 1e3
                row[f"{tier}_ms"] = ms
                row[f"{tier}_speedup"] = rec * 1e3 / ms
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = "| chunk tokens | codec | bytes/token | recompute ms | " + " | ".join(f"{t} ms (speedup)" for t in TIERS)
    lines = [head + " |", "|" + "---|" * (4 + len(TIERS))]
    for r in rows:
        cells = [f"{r[f'{t}_ms']:.1f} ({r[f'{t}_speedup']:.0f}x)" for t in TIERS]
        lines.append(
            f"| {r['chunk_tokens']} | {r['codec']} | {r['bytes_per_token']:.0f} | {r['recompute_ms']:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048], help="chunk sizes in tokens")
    ap.add_argument("--codecs", nargs="+", default=["fp16", "kivi4", "kivi2"])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    ap.add_argument("--redis", metavar="URL", help="use this Redis server instead of starting one")
    ap.add_argument("--disk-dir", help="where the disk tier's temporary directory goes (default: the system temp)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    engine = Engine(threads=args.threads)
    redis_server = contextlib.nullcontext(args.redis) if args.redis else local_redis()
    with tempfile.TemporaryDirectory(prefix="kvstash-bench-", dir=args.disk_dir) as tmp, redis_server as url:
        rows = run(engine, args, Path(tmp), url)
    print(table(rows))
    result = {"threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
