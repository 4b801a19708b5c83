"""The ``kvstash`` command: builds the parser from each subcommand's module and runs the chosen one."""

from __future__ import annotations

import argparse
import logging
import sys

from kvstash.cli import ask, bench, ingest, serve, store


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstash",
        description="KV-cache engine for RAG: chunk KV computed once, stored in tiers, reused at any position.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (ask, ingest, store, bench, serve):
        module.register(sub)
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
