"""``kvstash serve``: parses its arguments and runs the server (no logic of its own)."""

from __future__ import annotations

import argparse
import logging

from kvstash.cli.args import CODEC_HELP, STORE_HELP, add_model_args, add_speculate_arg
from kvstash.reuse import DEFAULT_STORE


def register(sub) -> None:
    """Add the ``serve`` subcommand to the ``kvstash`` subparsers ``sub``."""
    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Serve /v1/chat/completions, /v1/models and /v1/documents (register documents once, "
        "reuse their KV in every chat that names them), plus /health, /metrics and the browser playground at /.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    add_model_args(p)
    p.add_argument(
        "--store",
        metavar="SPEC",
        default=DEFAULT_STORE,
        help=f"{STORE_HELP} (default {DEFAULT_STORE}); servers sharing a Redis tier share their documents",
    )
    p.add_argument("--codec", default="fp16", help=CODEC_HELP)
    p.add_argument(
        "--reuse", metavar="METHOD", default="blend", help="full | prefix | naive | blend (default) | cacheblend"
    )
    add_speculate_arg(p)
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for the model before 503 (default 64)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=16,
        metavar="N",
        help="requests answered together, one token each per batched step (default 16; 1 = one at a time)",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=512,
        metavar="T",
        help="rows per batched step: every decoding request's token plus chunks of prompts being prefilled "
        "(default 512); a long prompt is prefilled over several steps so it never stalls the others for long",
    )
    p.add_argument(
        "--kv-budget",
        metavar="BYTES",
        help="KV cache all requests in the batch may hold, e.g. 6GiB (default: a quarter of the RAM); a request "
        "is admitted when its prompt's KV fits, the newest is preempted (and recomputed later) when decoding "
        "outgrows it, and one that could never fit gets a 400",
    )
    p.add_argument("--chunk-tokens", type=int, default=256, help="about how many tokens per document chunk (256)")
    p.add_argument(
        "--shutdown-timeout",
        type=int,
        default=10,
        metavar="SECONDS",
        help="on SIGTERM, how long the running generations may take to finish (default 10)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from kvstash.engine import Engine, EngineConfig
    from kvstash.server.app import ServerConfig, serve
    from kvstash.store import parse_size, parse_spec

    config = ServerConfig(
        host=args.host,
        port=args.port,
        reuse=args.reuse,
        max_queue=args.max_queue,
        chunk_tokens=args.chunk_tokens,
        shutdown_timeout_s=args.shutdown_timeout,
        max_batch=args.max_batch,
        max_batch_tokens=args.max_batch_tokens,
        kv_budget=parse_size(args.kv_budget) if args.kv_budget else None,
        speculate=args.speculate,
    )
    parse_spec(args.store)  # a bad spec fails now, not after the model has loaded
    logging.getLogger("kvstash.server").setLevel(logging.INFO)  # one JSON line per request
    engine = Engine(
        EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads, store=args.store, codec=args.codec)
    )
    return serve(engine, config)
