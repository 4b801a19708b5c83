"""``kvstash serve``: parses its arguments and runs the server (no logic of its own)."""

from __future__ import annotations

import argparse
import logging
import os

from kvstash.cli.args import CODEC_HELP, STORE_HELP, add_model_args, add_speculate_arg
from kvstash.reuse import DEFAULT_STORE

API_KEY_ENV = "KVSTASH_API_KEY"


def register(sub) -> None:
    """Add the ``serve`` subcommand to the ``kvstash`` subparsers ``sub``."""
    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models and /v1/documents (register "
        "documents once, reuse their KV in every request that names them), /tokenize and /detokenize, plus "
        "/health, /metrics and the browser playground at /.",
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
    _add_batch_args(p)
    p.add_argument("--chunk-tokens", type=int, default=256, help="about how many tokens per document chunk (256)")
    p.add_argument(
        "--shutdown-timeout",
        type=int,
        default=10,
        metavar="SECONDS",
        help="on SIGTERM, how long the running generations may take to finish (default 10)",
    )
    _add_security_args(p)
    p.set_defaults(func=cmd_serve)


def _add_batch_args(p: argparse.ArgumentParser) -> None:
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
        "(default 512; a row attending over a long context counts more, ~2.6 rows at 5K tokens for SmolLM2); "
        "a long prompt is prefilled over several steps, and a pass larger than T (blend's pass over a whole "
        "prompt) a few layers per step, so it never stalls the others for long",
    )
    p.add_argument(
        "--kv-budget",
        metavar="BYTES",
        help="KV cache all requests in the batch may hold, e.g. 6GiB (default: a quarter of the RAM); a request "
        "is admitted when its prompt's KV fits, the newest is preempted (its KV swapped to a file, see "
        "--preempt) when decoding outgrows it, and one that could never fit gets a 400",
    )
    p.add_argument(
        "--preempt",
        choices=("swap", "recompute"),
        default="swap",
        help="what happens to a preempted request's KV: 'swap' writes it to a file and reads it back when the "
        "request resumes (default; a cache that cannot be swapped is recomputed), 'recompute' drops it",
    )
    p.add_argument("--swap-dir", metavar="DIR", help="where swapped KV goes (default: a private temporary directory)")


def _add_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize (default: ${API_KEY_ENV}, "
        "else none: the API is open); /health, /metrics and the playground stay open, the playground asks for the key",
    )
    p.add_argument(
        "--allowed-origins",
        metavar="LIST",
        default="",
        help="comma-separated browser origins allowed to call the API (CORS), e.g. https://app.example.com, or * "
        "for any (default: none, no CORS headers; the playground is same-origin and needs none)",
    )
    p.add_argument(
        "--registry-sync",
        metavar="SECONDS",
        type=float,
        default=10.0,
        help="with a Redis store: how often to copy the documents other servers registered into this server's own "
        "copy, so a Redis outage does not lose them here (default 10; 0: never)",
    )
    p.add_argument(
        "--max-body-bytes",
        metavar="BYTES",
        default="8MiB",
        help="larger request bodies get 413 (default 8MiB)",
    )


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
        swap=args.preempt == "swap",
        swap_dir=args.swap_dir,
        speculate=args.speculate,
        api_key=args.api_key or None,
        allowed_origins=tuple(args.allowed_origins.split(",")),
        max_body_bytes=parse_size(args.max_body_bytes),
        registry_sync_s=args.registry_sync,
    )
    parse_spec(args.store)  # a bad spec fails now, not after the model has loaded
    logging.getLogger("kvstash.server").setLevel(logging.INFO)  # one JSON line per request
    engine = Engine(
        EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads, store=args.store, codec=args.codec)
    )
    return serve(engine, config)
