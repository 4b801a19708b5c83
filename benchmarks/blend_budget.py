"""Where blend's recompute budget goes on needle prompts: tokens chosen per passage, how many of the needle
sentence's and the code's tokens are chosen, and where they rank in the question's focus.

    .venv/bin/python benchmarks/blend_budget.py --dataset needle-code --n 8 --seed 1 --passages 6

One JSON line per prompt (stdout), then a short summary. Full prefill's greedy answer says whether the
needle is findable; blend's says whether blending kept it.
"""

from __future__ import annotations

import argparse
import json

import torch
from blend_study import greedy

from kvstash.bench.datasets import load_dataset
from kvstash.bench.metrics import contains_gold
from kvstash.engine import Engine
from kvstash.prompt import Segment
from kvstash.reuse.blend import BlendConfig, BlendReuse
from kvstash.reuse.full import FullPrefill
from kvstash.reuse.source import ChunkSource


class TracedBlend(BlendReuse):
    """``blend`` that keeps the last request's layout (with its focus) and chosen mask."""

    def pass_steps(self, runner, cache, layout, observe=None):
        out = yield from super().pass_steps(runner, cache, layout, observe)
        self.layout, self.chosen = layout, out[1]
        return out


def token_span(tokenizer, token_ids, text: str) -> list[int]:
    """Indices of the tokens (of a segment's ``token_ids``) that overlap the first occurrence of ``text``."""
    decoded, spans = "", []
    for t in token_ids:
        start = len(decoded)
        decoded += tokenizer.decode([t])
        spans.append((start, len(decoded)))
    lo = decoded.find(text)
    if lo < 0:
        raise ValueError(f"{text!r} not found in the segment's decoded tokens")
    hi = lo + len(text)
    return [i for i, (a, b) in enumerate(spans) if a < hi and b > lo]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="needle-code", choices=["needle", "needle-code"])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passages", type=int, default=6)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--query-share", type=float, default=0.75)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    engine = Engine(codec="fp16")
    source = ChunkSource.open(engine.runner, engine.lm.fingerprint, "ram:4GiB", "fp16")
    tok = engine.tokenizer
    rows = []
    for ex in load_dataset(args.dataset, n=args.n, passages=args.passages, seed=args.seed):
        plan = engine.plan([Segment(d) for d in ex.documents] + [Segment(ex.question, "user")])
        ref = FullPrefill(engine.config.prefill_chunk).prefill(engine.runner, plan)
        ref_text = tok.decode(greedy(engine, ref, args.max_tokens), skip_special_tokens=True)
        cfg = BlendConfig(ratio=args.ratio, query_share=args.query_share)
        method = TracedBlend(cfg)
        pre = method.prefill(engine.runner, plan, source)
        text = tok.decode(greedy(engine, pre, args.max_tokens), skip_special_tokens=True)
        layout, chosen = method.layout, method.chosen
        docs = [i for i, s in enumerate(plan.segments) if s.kind == "document"]
        gold = plan.segments[docs[ex.meta["gold_index"]]]
        first = gold.start - layout.start  # the gold passage's first token, relative to the layout
        needle = [first + i for i in token_span(tok, gold.token_ids, ex.meta["needle"])]
        code = [first + i for i in token_span(tok, gold.token_ids, ex.answers[0])]
        rank = torch.empty(len(layout.focus), dtype=torch.long)
        rank[torch.argsort(layout.focus, descending=True)] = torch.arange(len(layout.focus))
        row = dict(
            id=ex.id,
            gold_passage=ex.meta["gold_index"],
            full_found=contains_gold(ref_text, ex.answers),
            blend_found=contains_gold(text, ex.answers),
            chosen_per_passage=[int(chosen[layout.segment == i].sum()) for i in docs],
            needle_chosen=[int(chosen[needle].sum()), len(needle)],
            code_chosen=[int(chosen[code].sum()), len(code)],
            needle_best_focus_rank=int(rank[needle].min()),
            code_best_focus_rank=int(rank[code].min()),
            reused_tokens=int(layout.reused.sum()),
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
        source.store.clear()
    last = [r["chosen_per_passage"][-1] for r in rows]
    early = [r for r in rows if r["gold_passage"] < args.passages - 1]
    print(f"chosen in the last passage: {min(last)}-{max(last)} of ~{round(args.ratio * rows[0]['reused_tokens'])}")
    print(
        f"needle before the last passage: {len(early)} prompts, code never chosen in "
        f"{sum(r['code_chosen'][0] == 0 for r in early)}"
    )


if __name__ == "__main__":
    main()
