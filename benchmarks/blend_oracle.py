"""Would blend find full prefill's needles if it recomputed the needle itself? An oracle study.

    .venv/bin/python benchmarks/blend_oracle.py --seed 3 --n 25 --dtype bfloat16 --out out/oracle

On `needle-code` prompts (the harness of ``blend_eval.py``: full prefill the reference, passages shuffled,
chunk KV stored standalone), next to ``--methods`` (default ``blend:0.15``), two oracles that know where the
needle is and force tokens into blend's recompute, inside the same 15% budget (the rest of it spent as blend
spends it): ``oracle:needle``, the needle sentence's tokens; ``oracle:passage``, every token of the passage
that holds it. If the oracles find nearly all of full's needles, blend's misses are a selection problem (it
does not recompute the tokens that matter); if not, recomputing them is not enough and the misses come from
the rest of the reused KV.
"""

from __future__ import annotations

import torch
from blend_eval import parser, print_table, run

from kvstash.reuse.blend import BlendConfig, BlendReuse


class Forced(BlendReuse):
    """``blend`` with the reused tokens at ``positions`` [F] recomputed whatever their scores (in its budget)."""

    def __init__(self, positions: torch.Tensor, cfg: BlendConfig, prefill_chunk: int):
        super().__init__(cfg, prefill_chunk)
        self.positions = positions

    def forced(self, layout, idx, rel):
        forced, fired = super().forced(layout, idx, rel)
        forced[self.positions - layout.start] = True
        return forced, fired


def needle_positions(engine, example, plan, whole_passage: bool) -> torch.Tensor:
    """Prompt positions of the needle sentence's tokens (or of its whole passage) in ``plan``."""
    needle = example.meta["needle"]
    docs = [s for s in plan.segments if s.kind == "document"]
    j = next(i for i, d in enumerate(example.documents) if needle in d)
    seg = docs[j]
    if whole_passage:
        return torch.arange(seg.start, seg.end)
    body = example.documents[j].strip() + "\n\n"  # a document segment's text, as the prompt tokenizes it
    enc = engine.tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
    if tuple(enc["input_ids"]) != tuple(seg.token_ids):
        raise SystemExit(f"{example.id}: the passage tokenizes differently here than in the plan")
    lo = body.index(needle)
    hi = lo + len(needle)
    inside = [t for t, (a, b) in enumerate(enc["offset_mapping"]) if a < hi and b > lo]
    return seg.start + torch.tensor(inside)


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(methods=["blend:0.15"], n=25)
    args = ap.parse_args()
    if args.dataset != "needle-code" and args.dataset != "needle":
        ap.error("the oracles need a needle dataset (needle-code or needle)")
    cfg = BlendConfig()

    def oracle(whole_passage: bool):
        def build(engine, example, plan):
            positions = needle_positions(engine, example, plan, whole_passage)
            return Forced(positions, cfg, engine.config.prefill_chunk)

        return build

    print_table(args, run(args, {"oracle:needle": oracle(False), "oracle:passage": oracle(True)}))


if __name__ == "__main__":
    main()
