"""Arguments shared by several subcommands, and the engine they open. Parsing only, no logic of its own."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvstash.model.dtype import AUTO
from kvstash.model.dtype import DTYPES as MODEL_DTYPES
from kvstash.model.registry import DEFAULT_MODEL
from kvstash.reuse import DEFAULT_STORE

STORE_HELP = "chunk KV store, e.g. ram:4GiB,disk:~/.cache/kvstash/kv:50GiB,redis://127.0.0.1:6379/0"
CODEC_HELP = "how chunk KV is stored: fp16 (default), bf16, fp32, kivi8, kivi4, kivi2"


# The command line computes in bf16 where the CPU has it natively (AVX512-BF16 or AMX): there it prefills 3.1x faster
# than fp32 and decodes 1.7x faster 8 at a time, with a next-token KL of 0.0009 from fp32 (docs/benchmarks.md,
# "Compute dtype"); on an AVX2-only CPU bf16 is emulated and ~5x slower, so `auto` picks fp32 there. The library's
# EngineConfig stays float32, the exact reference.
DTYPES = (AUTO, *MODEL_DTYPES)
CLI_DTYPE = AUTO


def add_model_args(p: argparse.ArgumentParser, dtype: str = CLI_DTYPE) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or local HF directory (default {DEFAULT_MODEL})")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=dtype,
        help=f"compute dtype (default {dtype}: bfloat16 where the CPU has AVX512-BF16 or AMX, else float32); chunk KV "
        "is stored per dtype, so ingest and serve with the same one",
    )


def open_engine(args: argparse.Namespace):
    """The engine the arguments name (model, threads, store, codec)."""
    from kvstash.engine import Engine, EngineConfig

    store = getattr(args, "store", None) or DEFAULT_STORE
    codec = getattr(args, "codec", None) or "fp16"
    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads, store=store, codec=codec))
    engine.runner.choose_kernels()  # timed now (this thread runs the model), not in the first TTFT
    return engine


def read_docs(paths: list[str]) -> list[str]:
    """The text of each ``--doc`` file, in order. SystemExit naming a missing file."""
    docs = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise SystemExit(f"kvstash: --doc {p}: no such file")
        docs.append(path.read_text(encoding="utf-8", errors="replace"))
    return docs


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Everything ``ask`` and ``demo`` take: sampling and output, the store, reuse, compression."""
    _add_sampling_args(p)
    add_model_args(p)
    p.add_argument("--store", metavar="SPEC", help=f"{STORE_HELP} (default: an in-process ram store)")
    p.add_argument("--codec", help=CODEC_HELP)
    _add_reuse_args(p)
    _add_compression_args(p)
    add_speculate_arg(p)


# Speculative decoding by default on the command line (docs/benchmarks.md, "Speculative decoding").
CLI_SPECULATE = "off"


def add_speculate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculate",
        choices=("off", "ngram"),
        default=CLI_SPECULATE,
        help="speculative decoding: 'ngram' drafts the answer's next tokens from the prompt's documents and the "
        "answer so far and verifies them as a token tree in one forward; greedy output is the same as "
        f"without it (default {CLI_SPECULATE})",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="system prompt (default: a short RAG instruction)")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, help="seed for sampling (reproducible answers)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token up to --max-tokens")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_reuse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reuse",
        metavar="METHOD",
        help="full | prefix | naive | blend | cacheblend (plain CacheBlend, no question focus); blend:RATIO, or "
        "blend:auto to let the deviation at the check layer pick the ratio per prompt (up to 0.3) "
        "(default: blend with --store, else full)",
    )
    _add_blend_args(p)


def _add_blend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratio", type=float, help="blend: share of reused tokens recomputed (default 0.15)")
    p.add_argument("--check-layer", type=int, help="blend: layer where deviations are measured (default 1)")
    p.add_argument(
        "--probe-layers",
        type=int,
        metavar="N",
        help="blend: layers the question's naive probe runs through to find what it attends to (default: all)",
    )
    p.add_argument(
        "--focus",
        choices=("probe", "recent"),
        help="blend: where the question-focused share of the budget goes: probe = the reused tokens the question "
        "attends to most in a naive probe pass (default); recent = the reused tokens nearest the question, no "
        "probe pass",
    )
    p.add_argument(
        "--spans",
        type=int,
        metavar="N",
        help="blend: also recompute the N windows of reused tokens (a sentence or so each, see --span-width) "
        "around the question's strongest single reads in the probe, inside the ratio (default 3 with the "
        "probe; 0 = off)",
    )
    p.add_argument(
        "--span-width",
        type=int,
        metavar="W",
        help="blend: a --spans window is the W tokens either side of its centre (default 8)",
    )
    p.add_argument(
        "--budget",
        choices=("tokens", "work"),
        help="blend: what --ratio is a share of: tokens = the reused tokens (default); work = their cost through "
        "the recomputed layers, attention over the keys before them included, so tokens late in a long prompt "
        "use more of it",
    )
    p.add_argument(
        "--gate",
        type=float,
        help="blend: recompute a whole chunk when its relative KV deviation at the check layer exceeds this "
        "(off by default)",
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


def _add_compression_args(p: argparse.ArgumentParser) -> None:
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
