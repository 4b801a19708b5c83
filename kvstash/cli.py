"""Command-line interface: parses arguments and calls the library (no logic of its own)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from kvstash.models import DEFAULT_MODEL, list_models


def _engine(args):
    from kvstash.chunks import DEFAULT_STORE
    from kvstash.engine import Engine, EngineConfig

    store = getattr(args, "store", None) or DEFAULT_STORE
    codec = getattr(args, "codec", None) or "fp16"
    return Engine(EngineConfig(model=args.model, threads=args.threads, store=store, codec=codec))


def _reuse(args) -> str | None:
    """--reuse, defaulting to blend when a --store is given (else full)."""
    reuse = getattr(args, "reuse", None)
    if reuse is None:
        reuse = "blend" if getattr(args, "store", None) else "full"
    return reuse


def _read_docs(paths: list[str]) -> list[str]:
    docs = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise SystemExit(f"kvstash: --doc {p}: no such file")
        docs.append(path.read_text(encoding="utf-8", errors="replace"))
    return docs


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
    from kvstash.prompt import Segment
    from kvstash.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    segs = ([Segment(args.system, "system")] if args.system else []) + [Segment(d) for d in docs]
    segs.append(Segment(question, "user"))
    method = engine.method(
        _reuse(args),
        ratio=getattr(args, "ratio", None),
        check_layer=getattr(args, "check_layer", None),
        gate=getattr(args, "gate", None),
        query_share=getattr(args, "query_share", None),
        stale_bias=getattr(args, "stale_bias", None),
    )
    gen = engine.stream(
        segs,
        params,
        reuse=method,
        kv_bits=getattr(args, "kv_bits", None),
        evict=getattr(args, "evict", None),
        kv_alloc=getattr(args, "kv_alloc", None),
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
    docs = _read_docs(args.doc or [])
    return answer(_engine(args), args.question, docs, args)


def cmd_models(args) -> int:
    rows = [
        {"name": m.name, "package": m.package, "file": m.gguf_file, "default": m.name == DEFAULT_MODEL}
        for m in list_models()
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(
                f"{r['name']:<16} {r['file']} (from the {r['package']} package){'  [default]' if r['default'] else ''}"
            )
        print("Any local Hugging Face model directory of a Llama-family model also works: --model PATH")
    return 0


def cmd_demo(args) -> int:
    root = Path(__file__).parent / "demo_docs"
    files = sorted(p for p in root.iterdir() if p.name.endswith(".txt"))
    docs = [p.read_text(encoding="utf-8") for p in files]
    question = args.question
    print(f"Documents: {', '.join(p.name for p in files)}")
    print(f"Question: {question}\n")
    engine = _engine(args)
    print("Answer: ", end="")
    return answer(engine, question, docs, args)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="system prompt (default: a short RAG instruction)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or local HF directory (default {DEFAULT_MODEL})")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, help="seed for sampling (reproducible answers)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument(
        "--store",
        metavar="SPEC",
        help="chunk KV store, e.g. ram:4GiB,disk:~/.cache/kvstash/kv:50GiB,"
        "redis://127.0.0.1:6379/0 (default: an in-process ram store)",
    )
    p.add_argument("--codec", help="how chunk KV is stored: fp16 (default), bf16, fp32, kivi8, kivi4, kivi2")
    p.add_argument(
        "--reuse",
        metavar="METHOD",
        help="full | prefix | naive | blend | cacheblend (plain CacheBlend, no question focus) "
        "(default: blend with --store, else full)",
    )
    p.add_argument("--ratio", type=float, help="blend: share of reused tokens recomputed (default 0.15)")
    p.add_argument("--check-layer", type=int, help="blend: layer where deviations are measured (default 1)")
    p.add_argument(
        "--gate",
        type=float,
        help="blend: recompute a whole chunk when its relative KV deviation "
        "at the check layer exceeds this (off by default)",
    )
    p.add_argument(
        "--query-share",
        type=float,
        metavar="S",
        help="blend: share of the recompute budget spent on the reused tokens the question attends to most "
        "(found by a cheap naive pass); the rest goes by KV deviation. 0 = plain CacheBlend (default 0.75)",
    )
    p.add_argument(
        "--stale-bias",
        type=float,
        metavar="B",
        help="blend: added to the attention logits of the reused tokens that are not recomputed, in every "
        "layer from the check layer on and while decoding, so they weigh e^B as much (default -0.25; 0 = off)",
    )
    p.add_argument(
        "--kv-bits",
        type=int,
        choices=(2, 4, 8, 16),
        help="quantize the decode cache after prefill (KIVI; 16 = fp16). Default: compute dtype, no quantization",
    )
    p.add_argument(
        "--kv-alloc",
        choices=("uniform", "mixed"),
        help="with --kv-bits 4: 'mixed' measures how much each KV head's keys and values suffer at 2, 4 and 8 "
        "bits and gives 8 bits to those that gain most, paid for by those that lose least at 2, for the same "
        "bytes (default: uniform)",
    )
    p.add_argument(
        "--evict",
        metavar="POLICY:BUDGET",
        help="evict prompt tokens after prefill: snapkv | streaming | h2o, budget a ratio (snapkv:0.25) or a "
        "token count (h2o:512); add :decode to hold the budget while decoding (streaming, h2o)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstash",
        description="KV-cache engine for RAG: chunk KV computed once, stored in tiers, reused at any position.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "ask",
        help="answer a question over documents",
        description="Answer a question, optionally over documents, and print the answer and one line of timings.",
    )
    p.add_argument("question", help="the question")
    p.add_argument("--doc", action="append", metavar="FILE", help="a document file (repeatable, kept in order)")
    _add_generation_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("models", help="list the known models", description="List the models kvstash knows.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "demo",
        help="run a small RAG example on bundled documents",
        description="Answer a question over three short documents shipped with kvstash.",
    )
    p.add_argument("--question", default="Which two elements did Marie Curie discover?")
    _add_generation_args(p)
    p.set_defaults(func=cmd_demo)
    from kvstash.cli_store import register

    register(sub)
    from kvstash.bench.cli import register as register_bench

    register_bench(sub)
    from kvstash.server.cli import register as register_serve

    register_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="kvstash: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"kvstash: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
