"""Would blend find full prefill's needles if it recomputed the right tokens? Oracle studies.

    .venv/bin/python benchmarks/blend_oracle.py --seed 3 --n 25 --dtype bfloat16 --out out/oracle
    .venv/bin/python benchmarks/blend_oracle.py --seed 2 --n 25 --dtype bfloat16 --oracles deviation answer \\
        --oracle-ratio 0.1 0.3 --methods blend:0.1/spans=6 --out out/oracle-select

On `needle-code` prompts (the harness of ``blend_eval.py``: full prefill the reference, passages shuffled,
chunk KV stored standalone), next to ``--methods`` (default ``blend:0.15``), oracles that force tokens into
blend's recompute. Two know where the needle is and spend the rest of a 15% budget as blend does:
``oracle:needle``, the needle sentence's tokens; ``oracle:passage``, every token of the passage that holds it.
Two read full prefill itself and spend the whole budget (``--oracle-ratio`` of the reused tokens, no question
focus, no spans) on their pick: ``oracle:deviation``, the reused tokens whose stale chunk KV is furthest from
full prefill's (relative value distance summed over the layers from the check layer on: the tokens CacheBlend's
selection estimates at its check layer); ``oracle:answer``, the reused tokens that full prefill's question
and answer read most (attention summed over layers and heads: what the question focus estimates from its
naive probe). If an oracle finds nearly all of full's needles, blend's misses are a selection problem (it
does not recompute the tokens that matter); if not, recomputing them is not enough and the misses come from
the rest of the reused KV.
"""

from __future__ import annotations

import torch
from blend_eval import Case, parser, print_table, run

from kvstash.model.replay import attention_votes
from kvstash.reuse.blend import BlendConfig, BlendReuse
from kvstash.reuse.selection import deviation

ORACLES = ("needle", "passage", "deviation", "answer")


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


def stale_deviation(case: Case, first: int) -> torch.Tensor:
    """[T] per prompt token: the relative distance of its values in naive reuse's cache (for a reused token, its
    standalone chunk values) from full prefill's, summed over layers ``first`` and later."""
    n = len(case.plan)
    stale, full = case.naive.cache, case.ref.cache
    return sum(deviation(full.v[layer][:, :n], stale.v[layer][:, :n])[1] for layer in range(first, full.layers))


def answer_reads(case: Case) -> torch.Tensor:
    """[T] per prompt token: the attention full prefill's question and answer pay it (the rows after the last
    document, replayed over full's cache, summed over layers and KV heads)."""
    n = len(case.plan)
    start = max(s.end for s in case.plan.segments if s.kind == "document")
    ids = list(case.plan.token_ids) + case.answer[:-1]  # what the teacher-forced cache holds
    return attention_votes(case.engine.runner, case.ref.cache, ids, start, len(ids)).sum(dim=(0, 1))[:n]


def top_reused(score: torch.Tensor, plan, ratio: float) -> torch.Tensor:
    """Positions of the ``ratio`` share of the plan's document tokens with the highest ``score`` [T]."""
    reused = torch.cat([torch.arange(s.start, s.end) for s in plan.segments if s.kind == "document"])
    return reused[score[reused].topk(round(ratio * len(reused))).indices]


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(methods=["blend:0.15"], n=25)
    ap.add_argument("--oracles", nargs="+", choices=ORACLES, default=["needle", "passage"])
    ap.add_argument(
        "--oracle-ratio", nargs="+", type=float, default=[0.15], help="budgets of the deviation and answer oracles"
    )
    args = ap.parse_args()
    if args.dataset != "needle-code" and args.dataset != "needle":
        ap.error("the oracles need a needle dataset (needle-code or needle)")
    if not all(0 < r <= 1 for r in args.oracle_ratio):
        ap.error(f"--oracle-ratio takes shares of the reused tokens in (0, 1], got {args.oracle_ratio}")
    cfg = BlendConfig()

    def known(whole_passage: bool):  # the oracles that know where the needle is
        def build(case: Case):
            positions = needle_positions(case.engine, case.example, case.plan, whole_passage)
            return Forced(positions, cfg, case.engine.config.prefill_chunk)

        return build

    scores = {}  # (oracle, prompt id) -> its scores, shared by the oracle's ratios

    def from_full(name: str, score_fn, ratio: float):  # the oracles that read full prefill
        whole_budget = BlendConfig(ratio=ratio, query_share=0.0, spans=0)  # no probe, no spans: all the oracle's

        def build(case: Case):
            key = (name, case.example.id)
            if key not in scores:
                scores.clear()
                scores[key] = score_fn(case)
            positions = top_reused(scores[key], case.plan, ratio)
            return Forced(positions, whole_budget, case.engine.config.prefill_chunk)

        return build

    built = {}
    for name in args.oracles:
        if name in ("needle", "passage"):
            built[f"oracle:{name}"] = known(name == "passage")
            continue
        score_fn = answer_reads if name == "answer" else (lambda case: stale_deviation(case, cfg.check_layer))
        for ratio in args.oracle_ratio:
            built[f"oracle:{name}:{ratio:g}"] = from_full(name, score_fn, ratio)
    print_table(args, run(args, built))


if __name__ == "__main__":
    main()
