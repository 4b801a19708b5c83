"""Does the probe's strongest single read find the needle? Where the needle ranks in blend's question focus.

    .venv/bin/python benchmarks/blend_peaks.py --seed 0 --n 12 --dtype bfloat16

On `needle-code` prompts (``blend_eval.py``'s harness: passages shuffled, chunk KV stored standalone), one
``blend`` prefill per prompt, and from its probe: the rank among the reused tokens of the needle sentence's
best token, by the summed focus (what the focused share of the budget follows) and by the peak (the largest
single weight any layer, head and question row pays a token, what ``spans`` follow); and whether the first
1, 3 and 10 ``spans`` windows (``--width``) hold any of the needle sentence. One line per prompt, then totals.
"""

from __future__ import annotations

import torch
from blend_eval import parser
from blend_oracle import needle_positions

from kvstash.bench.datasets import load_dataset
from kvstash.engine import Engine
from kvstash.prompt import Segment
from kvstash.reuse.blend import BlendConfig, BlendReuse
from kvstash.reuse.partial import NaiveReuse
from kvstash.reuse.selection import spans
from kvstash.reuse.source import ChunkSource

COUNTS = (1, 3, 10)


class Seen(BlendReuse):
    """``blend`` that keeps the layout of its last prefill (its probe's focus and peaks)."""

    def forced(self, layout, idx, rel):
        self.layout = layout
        return super().forced(layout, idx, rel)


def ranks(layout, needle: torch.Tensor, width: int) -> dict:
    """Rank of the needle's best token by focus and by peak; whether the first spans hold it."""
    out = {}
    for name, score in (("focus", layout.focus), ("peak", layout.peak)):
        score = score.masked_fill(~layout.reused, float("-inf"))
        order = score.argsort(descending=True)
        out[f"{name}_rank"] = int(torch.isin(order, needle).nonzero()[0])
    peak = layout.peak.masked_fill(~layout.reused, float("-inf"))
    for k in COUNTS:
        out[f"spans{k}"] = bool(spans(peak, layout.segment, k, width)[needle].any())
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(n=12)
    ap.add_argument("--width", type=int, default=BlendConfig().span_width, help="span_width of the windows")
    args = ap.parse_args()
    engine = Engine(dtype=args.dtype, threads=args.threads)
    source = ChunkSource.open(engine.runner, engine.lm.fingerprint, "ram:8GiB", args.codec)
    opts = {"haystack": args.haystack} if args.haystack else {}
    method = Seen(BlendConfig(), engine.config.prefill_chunk)
    rows = []
    for ex in load_dataset(args.dataset, n=args.n, passages=args.passages, seed=args.seed, **opts):
        plan = engine.plan([Segment(d) for d in ex.documents] + [Segment(ex.question, "user")])
        NaiveReuse().prefill(engine.runner, plan, source)  # every chunk in the store, standalone
        method.prefill(engine.runner, plan, source)
        needle = needle_positions(engine, ex, plan, False) - method.layout.start
        rows.append(dict(id=ex.id, reused=int(method.layout.reused.sum()), **ranks(method.layout, needle, args.width)))
        print(rows[-1], flush=True)
        source.store.clear()
    n = len(rows)
    print(
        f"{n} prompts: needle's best token by focus ranks {min(r['focus_rank'] for r in rows)}-"
        f"{max(r['focus_rank'] for r in rows)} (0 = first), by peak {min(r['peak_rank'] for r in rows)}-"
        f"{max(r['peak_rank'] for r in rows)}; needle in the first "
        + ", ".join(f"{k} spans: {sum(r[f'spans{k}'] for r in rows)}/{n}" for k in COUNTS)
    )


if __name__ == "__main__":
    main()
