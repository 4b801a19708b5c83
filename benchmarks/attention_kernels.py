"""PyTorch's fused attention kernel on the decoder's shapes, in its two layouts, per dtype, query and key count.

    .venv/bin/python benchmarks/attention_kernels.py --queries 1,4,16,128 --keys 300,1000,3000

SmolLM2-135M's heads (9 query heads sharing 3 KV heads, head dim 64). *shared* is one call of ``H`` heads of
``Tq`` rows with ``enable_gqa`` (each query head reads its KV head); *grouped* is one call of ``KVH`` heads of
``H / KVH * Tq`` rows (a KV head's query heads side by side, the mask repeated per query head), what
:func:`kvstash.model.attention.sdpa` runs in a reduced dtype (bf16, fp16). Both with a causal boolean
mask (``Tq`` > 1) or none (one query), as the layer loop calls them. Medians of ``--repeat`` runs,
microseconds; ``shared / grouped`` is how much faster grouping is.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from decode_step import _median_s  # benchmarks/ is on the path when a script there runs

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def _us(fn, repeat: int) -> float:
    return _median_s(fn, repeat) * 1e6


def measure(dtype: torch.dtype, tq: int, n: int, repeat: int) -> dict:
    group = HEADS // KV_HEADS
    q = torch.randn(HEADS, tq, HEAD_DIM, dtype=dtype)
    k, v = torch.randn(KV_HEADS, n, HEAD_DIM, dtype=dtype), torch.randn(KV_HEADS, n, HEAD_DIM, dtype=dtype)
    mask = None if tq == 1 else torch.ones(tq, n, dtype=torch.bool).tril(n - tq)  # [Tq, n], causal

    def shared():
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)

    def grouped():
        m = None if mask is None else mask.repeat(group, 1)  # the repeat is part of the cost
        return F.scaled_dot_product_attention(q.reshape(KV_HEADS, group * tq, HEAD_DIM)[None], k[None], v[None], m)

    a, b = _us(shared, repeat), _us(grouped, repeat)
    dt = str(dtype).removeprefix("torch.")
    return {"dtype": dt, "queries": tq, "keys": n, "shared_us": round(a, 1), "grouped_us": round(b, 1),
            "shared_over_grouped": round(a / b, 2)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", default="1,4,16,128", help="query rows per call, comma-separated")
    ap.add_argument("--keys", default="300,1000,3000", help="cached keys, comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeat", type=int, default=50, help="timed runs per median")
    args = ap.parse_args()
    torch.manual_seed(0)
    with torch.inference_mode():
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            for tq in (int(x) for x in args.queries.split(",")):
                for n in (int(x) for x in args.keys.split(",")):
                    print(json.dumps(measure(dtype, tq, n, args.repeat)), flush=True)
    print(f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
