"""``kvstash ask``, ``kvstash demo`` and ``kvstash models``: parse, call the engine, print."""

from __future__ import annotations

import json
from pathlib import Path

from kvstash.cli.args import add_generation_args, open_engine, read_docs
from kvstash.model.registry import DEFAULT_MODEL, list_models

DEMO_QUESTION = "Which two elements did Marie Curie discover?"
PLAYGROUND_HINT = (
    "See blending in a browser: run `kvstash serve` and open the playground at http://127.0.0.1:8000/ "
    "(your own documents, full prefill and blend side by side, the recomputed tokens highlighted)"
)


def _reuse(args) -> str:
    """--reuse, defaulting to blend when a --store is given (else full)."""
    if args.reuse is not None:
        return args.reuse
    return "blend" if args.store else "full"


def _timings_line(s: dict, load_s: float | None = None) -> str:
    parts = [
        f"prompt {s['prompt_tokens']} tok",
        f"reused {s['reused_tokens']}",
        f"recomputed {s['recomputed_tokens']}",
        f"ttft {s['ttft_s']:.3f} s",
        f"prefill {s['prefill_tok_s']:.0f} tok/s",
        f"decode {s['decode_tok_s']:.1f} tok/s",
        f"{s['completion_tokens']} tok out",
    ]
    if load_s is not None:
        parts.append(f"model load {load_s:.1f} s")
    return "[" + " | ".join(parts) + "]"


def answer(engine, question: str, docs: list[str], args) -> int:
    """Answer ``question`` over ``docs`` with the engine and print it (text or ``--json``)."""
    from kvstash.prompt import Segment
    from kvstash.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        ignore_eos=args.ignore_eos,
    )
    segs = ([Segment(args.system, "system")] if args.system else []) + [Segment(d) for d in docs]
    segs.append(Segment(question, "user"))
    blend_opts = {
        k: getattr(args, k)
        for k in (
            "ratio",
            "check_layer",
            "gate",
            "query_share",
            "stale_bias",
            "probe_layers",
            "focus",
            "budget",
            "spans",
            "span_width",
        )
    }
    gen = engine.stream(
        segs,
        params,
        reuse=engine.method(_reuse(args), **blend_opts),
        kv_bits=args.kv_bits,
        evict=args.evict,
        kv_alloc=args.kv_alloc,
        speculate=args.speculate,
    )
    for delta in gen:
        if args.stream and not args.json:
            print(delta, end="", flush=True)
    summary = gen.result.summary()
    summary["model"] = engine.lm.name
    summary["model_load_s"] = round(engine.lm.load_s, 3)
    if gen.result.prefill.method != "full":
        summary["segments"] = [vars(x) for x in gen.result.prefill.segments]
        summary["gate_fired"] = gen.result.prefill.gate_fired
    if args.json:
        print(json.dumps(summary))
    else:
        if not args.stream:
            print(gen.result.text, end="")
        print()
        print(_timings_line(summary, engine.lm.load_s))
    return 0


def cmd_ask(args) -> int:
    docs = read_docs(args.doc or [])
    with open_engine(args) as engine:
        return answer(engine, args.question, docs, args)


def cmd_demo(args) -> int:
    root = Path(__file__).parent.parent / "demo_docs"
    files = sorted(p for p in root.iterdir() if p.name.endswith(".txt"))
    docs = [p.read_text(encoding="utf-8") for p in files]
    print(f"Documents: {', '.join(p.name for p in files)}")
    print(f"Question: {args.question}\n")
    with open_engine(args) as engine:
        print("Answer: ", end="")
        status = answer(engine, args.question, docs, args)
    if not args.json:
        print(f"\n{PLAYGROUND_HINT}")
    return status


def cmd_models(args) -> int:
    rows = [
        {"name": m.name, "package": m.package, "file": m.gguf_file, "default": m.name == DEFAULT_MODEL}
        for m in list_models()
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        default = "  [default]" if r["default"] else ""
        print(f"{r['name']:<16} {r['file']} (from the {r['package']} package){default}")
    print("Any local Hugging Face model directory of a Llama-family model also works: --model PATH")
    return 0


def register(sub) -> None:
    """Add ``ask``, ``models`` and ``demo`` to the top-level subparsers ``sub``."""
    p = sub.add_parser(
        "ask",
        help="answer a question over documents",
        description="Answer a question, optionally over documents, and print the answer and one line of timings.",
    )
    p.add_argument("question", help="the question")
    p.add_argument("--doc", action="append", metavar="FILE", help="a document file (repeatable, kept in order)")
    add_generation_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("models", help="list the known models", description="List the models kvstash knows.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "demo",
        help="run a small RAG example on bundled documents",
        description="Answer a question over three short documents shipped with kvstash.",
    )
    p.add_argument("--question", default=DEMO_QUESTION)
    add_generation_args(p)
    p.set_defaults(func=cmd_demo)
