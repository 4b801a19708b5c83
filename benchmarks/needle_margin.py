"""How close to a coin flip are full prefill's needles? Margins, and full prefill in another precision.

    .venv/bin/python benchmarks/needle_margin.py --seed 2 --n 25 --out out/margin
    .venv/bin/python benchmarks/needle_margin.py --haystack wikimqa --seed 2 --n 50 --passages 7 --out out/margin
    .venv/bin/python benchmarks/needle_margin.py --seed 2 --n 25 --no-exact --flip --methods --out out/flip

On the prompts of ``blend_eval.py`` (same datasets and seeds, so the same prompts), full prefill in ``--dtype``
(bf16 by default) is the reference: its greedy answer, and along that answer each token's *margin* (its logit
minus the best other logit, teacher-forced). A needle's *decisive margin* is the smallest margin up to the
token that completes the code: below ~1 logit the answer hangs on a near tie (often " " against ":" right
after "... project is"), and any perturbation of the KV may flip it. Then, on the same prompt:

- *exact*: full prefill in ``--exact-dtype`` (fp32 by default), or in passes of ``--exact-chunk`` tokens
  instead of the engine's 512: another exact computation of the same model, which differs from the
  reference only in rounding. How many of the reference's needles it keeps is the noise floor of the needle
  metric: a reuse method cannot be expected to keep more.
  ``--no-exact`` skips this column.
- *flip* (``--flip``): on each needle full finds, full's answer again with its decisive token replaced by the
  runner-up (teacher-forced up to it, then greedy): does full prefill itself still answer with the code on
  the other side of its closest tie? Its "needles found" counts over full's needles, the prompts it ran on.
- each of ``--methods`` (reuse specs as in ``blend_eval.py``, in ``--dtype``): needle found, and its smallest
  margin along full's answer (negative: its greedy answer leaves full's there).

The table splits full's needles by decisive margin (below / at least ``--near`` logits). Output:
``OUT/NAME.json`` (per prompt and summary) and a markdown table on stdout. Timing is not measured.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from blend_eval import code_end, greedy, parse_method, parser, save
from tqdm import tqdm

from kvstash.bench.datasets import load_dataset
from kvstash.bench.metrics import contains_gold, logit_margins
from kvstash.engine import Engine
from kvstash.model.dtype import resolve_dtype
from kvstash.prompt import Segment
from kvstash.reuse.full import FullPrefill
from kvstash.reuse.partial import NaiveReuse
from kvstash.reuse.source import ChunkSource
from kvstash.sampling import SamplingParams


def run(args) -> dict:
    engine = Engine(dtype=args.dtype, threads=args.threads)
    same = args.no_exact or resolve_dtype(args.exact_dtype) == resolve_dtype(args.dtype)
    other = engine if same else Engine(dtype=args.exact_dtype, threads=args.threads)
    source = ChunkSource.open(engine.runner, engine.lm.fingerprint, "ram:8GiB", args.codec)
    opts = {"haystack": args.haystack} if args.haystack else {}
    examples = load_dataset(args.dataset, n=args.n, passages=args.passages, seed=args.seed, **opts)
    if args.pick:  # a look at chosen prompts (e.g. the misses of an earlier run)
        examples = [examples[i] for i in args.pick]
    chunk = engine.config.prefill_chunk
    other_chunk = args.exact_chunk or chunk
    if other is engine and other_chunk == chunk and not args.no_exact:
        raise SystemExit("exact would be the reference itself: give another --exact-dtype or --exact-chunk")
    methods = {spec: parse_method(spec, chunk) for spec in args.methods}
    rows = []
    for ex in tqdm(examples, desc=f"{args.dataset} seed {args.seed}"):
        plan = engine.plan([Segment(d) for d in ex.documents] + [Segment(ex.question, "user")])
        ref = FullPrefill(chunk).prefill(engine.runner, plan)
        ids = greedy(engine, ref, args.max_tokens)
        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        upto = code_end(engine, ids, ex.answers)
        logits = engine.teacher_forced_logits(ref, ids)  # ref.cache now holds the answer but its last token
        margin = logit_margins(logits, ids)[:upto]
        row = dict(id=ex.id, tokens=len(plan), text=text, found=contains_gold(text, ex.answers))
        row["margin"] = float(margin.min())
        row["margin_at"] = engine.tokenizer.decode([ids[int(margin.argmin())]])
        if args.flip and row["found"]:
            at = int(margin.argmin())
            flip = flipped(engine, ref, len(plan), ids, logits, at, args.max_tokens)
            flip_text = engine.tokenizer.decode(flip, skip_special_tokens=True)
            to = engine.tokenizer.decode([flip[at]])
            row["flip"] = dict(to=to, text=flip_text, found=contains_gold(flip_text, ex.answers))
        if not args.no_exact:
            alt = FullPrefill(other_chunk).prefill(other.runner, plan)  # same model, same tokens
            alt_text = other.tokenizer.decode(greedy(other, alt, args.max_tokens), skip_special_tokens=True)
            row["exact"] = dict(text=alt_text, found=contains_gold(alt_text, ex.answers))
        if methods:
            NaiveReuse().prefill(engine.runner, plan, source)  # every chunk in the store
        for spec, method in methods.items():
            pre = method.prefill(engine.runner, plan, source)
            m_text = engine.tokenizer.decode(greedy(engine, pre, args.max_tokens), skip_special_tokens=True)
            along = logit_margins(engine.teacher_forced_logits(pre, ids), ids)[:upto]
            row[spec] = dict(text=m_text, found=contains_gold(m_text, ex.answers), margin=float(along.min()))
        source.store.clear()
        rows.append(row)
        if args.out:
            write(args, rows, partial=True)
    return write(args, rows)


def flipped(engine: Engine, ref, n: int, ids: list[int], logits: torch.Tensor, at: int, max_tokens: int) -> list[int]:
    """Full prefill's answer ``ids`` with its token ``at`` replaced by the runner-up of ``logits[at]`` (``logits``
    [T, V]: teacher-forced along ``ids``), then greedy again, up to ``max_tokens`` tokens in all. ``ref.cache``
    holds the ``n`` prompt tokens and the answer but its last token (teacher-forced); it is left as it was."""
    runner_up = int(logits[at].float().index_fill(0, torch.tensor([ids[at]]), float("-inf")).argmax())
    head = [*ids[:at], runner_up]
    if len(head) >= max_tokens or runner_up in engine.eos_ids:
        return head
    cache = ref.cache.clone()
    cache.truncate(n + at)  # the prompt and the answer before the flipped token
    last = engine.runner.forward(torch.tensor([runner_up]), torch.tensor([n + at]), cache)
    # decoding goes on after the flipped token: its positions start at n + at + 1
    after = replace(ref, cache=cache, last_logits=last, report=replace(ref.report, prompt_tokens=n + at + 1))
    return head + engine.decode(after, SamplingParams(max_tokens=max_tokens - len(head))).token_ids


def columns(args) -> list[str]:
    """The table's columns: full, exact (unless ``--no-exact``), flip (with ``--flip``), each method."""
    return ["full", *(["exact"] if not args.no_exact else []), *(["flip"] if args.flip else []), *args.methods]


def found_in(row: dict, name: str) -> bool:
    """Whether column ``name`` found the needle on ``row`` (flip ran only where full found it)."""
    if name == "full":
        return row["found"]
    if name == "flip":
        return "flip" in row and row["flip"]["found"]
    return row[name]["found"]


def summarize(rows: list[dict], names: list[str], near: float) -> list[dict]:
    """Per column ``names`` (see :func:`columns`): needles found, and full's needles kept, split by full's
    decisive margin. ``flip`` (full prefill with its decisive token flipped) is measured on full's needles only."""
    hit = [r for r in rows if r["found"]]
    close = [r for r in hit if r["margin"] < near]
    table = []
    for name in names:
        kept, kept_near = (sum(found_in(r, name) for r in rs) for rs in (hit, close))
        table.append(
            dict(
                column=name,
                n=len(hit) if name == "flip" else len(rows),
                found=sum(found_in(r, name) for r in rows),
                kept=kept,
                of=len(hit),
                kept_near=kept_near,
                near=len(close),
                kept_clear=kept - kept_near,
                clear=len(hit) - len(close),
            )
        )
    return table


def write(args, rows: list[dict], partial: bool = False) -> dict:
    return save(
        args, {"config": vars(args), "summary": summarize(rows, columns(args), args.near), "rows": rows}, partial
    )


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(n=25, seed=2, dtype="bfloat16", methods=["blend:0.15", "blend:0.1/spans=6"], out=Path("out/margin"))
    ap.add_argument("--exact-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--exact-chunk", type=int, help="exact's prefill pass size (default: the engine's)")
    ap.add_argument(
        "--pick", type=lambda v: [int(i) for i in v.split(",")], help="only these prompts of the --n (0-based: 6,10)"
    )
    ap.add_argument("--no-exact", action="store_true", help="skip the exact column (a second full prefill)")
    ap.add_argument(
        "--flip",
        action="store_true",
        help="for each needle full finds: its answer again with the decisive token replaced by the runner-up",
    )
    ap.add_argument("--near", type=float, default=1.0, help="a decisive margin below this many logits is near a tie")
    args = ap.parse_args()
    if args.no_exact and args.exact_chunk is not None:
        ap.error("--exact-chunk sets the exact column's pass size: drop it, or drop --no-exact")
    if args.exact_chunk is not None and args.exact_chunk < 1:
        ap.error(f"--exact-chunk must be a positive number of tokens, got {args.exact_chunk}")
    if args.pick and not all(0 <= i < args.n for i in args.pick):
        ap.error(f"--pick takes prompt indices from 0 to {args.n - 1} (the first --n {args.n} prompts)")
    result = run(args)
    print(f"{args.dataset} {args.haystack or ''} seed {args.seed}: {args.n} prompts, {args.passages} passages")
    print(f"| column | needles found | full's kept | of those near a tie (< {args.near} logit) | of the clear ones |")
    print("|---|---|---|---|---|")
    for r in result["summary"]:
        print(
            f"| {r['column']} | {r['found']}/{r['n']} | {r['kept']}/{r['of']} | {r['kept_near']}/{r['near']} | "
            f"{r['kept_clear']}/{r['clear']} |"
        )


if __name__ == "__main__":
    main()
