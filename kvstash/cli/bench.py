"""``kvstash bench``: argument parsing for the benchmark; the work is in runner and report."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import replace

from kvstash.bench.methods import BASELINES, DEFAULT_METHODS
from kvstash.cli.args import DTYPES
from kvstash.model.registry import DEFAULT_MODEL

DATASETS = ("musique", "wikimqa", "nq", "squad", "kv", "needle", "needle-code", "chat")
METHODS_HELP = f"""\
methods (--methods, comma-separated; plain full is always run first, as the reference):
  full | prefix | naive | blend[:RATIO] | cacheblend[:RATIO]    kvstash reuse methods (cacheblend: plain CacheBlend)
  {" | ".join(BASELINES)}                    transformers generate / with a cached prompt head / prompt lookup
  METHOD+CODEC      chunk store codec, e.g. blend:0.15+kivi4
  METHOD+spec       speculative decoding (n-gram drafts verified as a token tree), e.g. blend:0.15+spec
  METHOD@kvBITS     quantized working KV, e.g. full@kv4
  METHOD@POLICY:B   KV eviction, e.g. full@snapkv:0.25
default: {DEFAULT_METHODS}
--quick: 3 examples, 3 passages, 16 tokens, full,naive,blend:0.15,hf (flags given still win)"""


def _gold_position(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _depth(text: str) -> float | str:
    return text if text == "random" else float(text)


def register(sub) -> None:
    """Add the ``bench`` subcommand to the ``kvstash`` subparsers."""
    p = sub.add_parser(
        "bench",
        help="benchmark reuse methods on a QA dataset",
        description="Run reuse methods and transformers baselines on a dataset: TTFT, speedup vs full "
        "prefill, quality, fidelity to full prefill, KV bytes. Prints a markdown table; writes "
        "results.json, results.csv and quality_vs_ttft.png to --out.",
        epilog=METHODS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", choices=DATASETS, help="which dataset")
    p.add_argument("--methods", help=f"comma-separated method specs (default {DEFAULT_METHODS})")
    p.add_argument("--n", type=int, help="examples (default 20)")
    p.add_argument("--passages", type=int, help="passages per prompt (default 6)")
    p.add_argument("--max-tokens", type=int, help="tokens generated per answer, greedy (default 32)")
    p.add_argument("--seed", type=int, default=0, help="dataset sampling seed (default 0)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="generate N examples' answers together with continuous batching (Engine.generate_many), per method: "
        "req/s then shows each method's throughput under load and TTFT is measured under load; answers, "
        "accuracy and KL are the same as one at a time (default 1)",
    )
    p.add_argument("--quick", action="store_true", help="a small run: 2-4 minutes on 2 cores")
    p.add_argument("--out", metavar="DIR", default="bench-out", help="output folder (default bench-out)")
    p.add_argument("--data-dir", metavar="DIR", help="folder of the data files (default ../shared/data)")
    p.add_argument("--gold-position", type=_gold_position, help="nq/squad/kv: index, first, middle, last or random")
    p.add_argument("--depth", type=_depth, help="needle, needle-code: depth in [0, 1] or random (default random)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or local HF directory (default {DEFAULT_MODEL})")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="compute dtype of every method, baselines included (default float32, the exact reference; auto: "
        "bfloat16 where the CPU has AVX512-BF16 or AMX)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)


def config_from_args(args):
    from kvstash.bench.methods import parse_methods
    from kvstash.bench.runner import BenchConfig

    opts = {k: v for k, v in (("gold_position", args.gold_position), ("depth", args.depth)) if v is not None}
    given = {"n": args.n, "passages": args.passages, "max_tokens": args.max_tokens, "methods": args.methods}
    common = {
        "seed": args.seed,
        "concurrency": args.concurrency,
        "data_dir": args.data_dir,
        "dataset_options": opts,
        "progress": not args.no_progress,
    }
    if args.quick:
        config = BenchConfig.quick(args.dataset, **given, **common)
    else:
        given = {k: v for k, v in given.items() if v is not None}
        given["methods"] = parse_methods(given.get("methods", DEFAULT_METHODS))
        config = BenchConfig(args.dataset, **given, **common)
    return replace(config, command=command_line(config, args))


def command_line(config, args) -> str:
    """The explicit command that repeats ``config`` (every setting spelled out), kept in results.json."""
    argv = ["kvstash", "bench", config.dataset, "--n", str(config.n), "--passages", str(config.passages)]
    argv += ["--max-tokens", str(config.max_tokens), "--seed", str(config.seed)]
    argv += ["--methods", ",".join(m.name for m in config.methods)]
    if config.concurrency != 1:
        argv += ["--concurrency", str(config.concurrency)]
    for key, value in config.dataset_options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    for flag, value in (("--data-dir", args.data_dir), ("--threads", args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    if args.model != DEFAULT_MODEL:
        argv += ["--model", args.model]
    if args.dtype != "float32":
        argv += ["--dtype", args.dtype]
    return shlex.join(argv)


def cmd_bench(args) -> int:
    from kvstash.bench.datasets import FILES, data_file
    from kvstash.bench.report import headline, markdown_table, write_all
    from kvstash.bench.runner import run_bench
    from kvstash.engine import Engine, EngineConfig

    config = config_from_args(args)
    data_file(FILES[config.dataset], config.data_dir)  # a missing file fails here, before the model loads
    engine = Engine(EngineConfig(model=args.model, threads=args.threads, dtype=args.dtype))
    result = run_bench(engine, config)
    paths = write_all(result, args.out)
    print(headline(result.config))
    print()
    print(markdown_table(result.methods))
    print()
    print(f"wrote {paths['json']}, {paths['csv']}, {paths['png']}")
    return 0
