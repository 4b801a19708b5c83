"""``kvstash ingest``: split files into chunks and precompute their KV into a chunk store.

Argument parsing and printing only; the work is in :mod:`kvstash.splitting` and :meth:`kvstash.Engine.ingest`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from kvstash.cli.args import CODEC_HELP, STORE_HELP, add_model_args, open_engine

INGEST_SUFFIXES = (".txt", ".md")  # what ingest picks up when walking a directory
MIN_CHUNK_TOKENS = 16


def find_files(paths: list[str]) -> list[Path]:
    """Files named, plus the .txt/.md files under directories named (recursively, sorted), each once."""
    found: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            found += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in INGEST_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    found = list(dict.fromkeys(found))
    if not found:
        raise ValueError(f"no {'/'.join(INGEST_SUFFIXES)} files under {', '.join(paths)}; name files or directories")
    return found


def cmd_ingest(args) -> int:
    from tqdm import tqdm

    from kvstash.splitting import document_chunks

    if args.chunk_tokens < MIN_CHUNK_TOKENS:
        raise ValueError(f"--chunk-tokens must be at least {MIN_CHUNK_TOKENS}, got {args.chunk_tokens}")
    files = find_files(args.paths)
    with open_engine(args) as engine:
        if args.chunk_tokens > engine.lm.context_limit:
            raise ValueError(f"--chunk-tokens {args.chunk_tokens} exceeds {engine.lm.name}'s {engine.lm.context_limit}")
        texts = [
            chunk
            for f in files
            for chunk in document_chunks(
                engine.builder, f.read_text(encoding="utf-8", errors="replace"), args.chunk_tokens
            )
        ]
        total = sum(len(engine.builder.tokenize(t, "document")) for t in texts)
        with tqdm(total=total, unit="tok", desc="ingest", disable=None) as bar:
            report = engine.ingest(texts, progress=bar.update)
        summary = {"files": len(files), **asdict(report), "seconds": round(report.seconds, 3)}
        summary["tier_stats"] = [asdict(s) for s in engine.store_stats()]
    if args.json:
        print(json.dumps(summary))
    else:
        rate = report.computed_tokens / report.seconds if report.seconds else 0.0
        print(
            f"{len(files)} files, {report.chunks} chunks, {report.tokens} tokens: "
            f"{report.stored} stored, {report.skipped} already stored, {report.failed} not stored; "
            f"{report.seconds:.1f} s ({rate:.0f} tok/s computed)"
        )
    return 0


def register(sub) -> None:
    """Add ``ingest`` to the top-level subparsers ``sub``."""
    p = sub.add_parser(
        "ingest",
        help="precompute the KV of documents into a chunk store",
        description="Split files into chunks of at most --chunk-tokens tokens (at paragraph, then sentence "
        "boundaries), compute each chunk's KV as a document and put it in the store; chunks already "
        "stored are skipped. Directories are walked for .txt and .md files. Pass the same chunks as "
        "documents to reuse them (kvstash.splitting.split_text); `ask --doc FILE` reuses a file that "
        "fits in one chunk.",
    )
    p.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="files, or directories to walk")
    p.add_argument("--store", required=True, metavar="SPEC", help=STORE_HELP)
    p.add_argument("--chunk-tokens", type=int, default=512, help="most tokens per chunk (default 512)")
    add_model_args(p)
    p.add_argument("--codec", default="fp16", help=CODEC_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON summary instead of text")
    p.set_defaults(func=cmd_ingest)
