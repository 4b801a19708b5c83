"""The ``kvstash ingest`` and ``kvstash store`` commands: fill a chunk store ahead of time and look after it.

Argument parsing and printing only; the work is in :mod:`kvstash.chunking` and :mod:`kvstash.store`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from kvstash.models import DEFAULT_MODEL

INGEST_SUFFIXES = (".txt", ".md")  # what ingest picks up when walking a directory
MIN_CHUNK_TOKENS = 16
# The store commands act on every record whatever model or codec wrote it, so they open the tiers with
# a placeholder config; it is never used to read or write a chunk.
_ADMIN_FINGERPRINT = "kvstash-store-admin"
_STORE_HELP = "chunk store spec, e.g. disk:~/.cache/kvstash/kv:50GiB,redis://127.0.0.1:6379/0"
_STAT_COLUMNS = ("entries", "bytes", "hits", "misses", "evictions", "corrupt", "errors", "bytes_per_token")


# --- ingest --------------------------------------------------------------------------------------------


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

    from kvstash.chunking import document_chunks, ingest
    from kvstash.cli import _engine

    if args.chunk_tokens < MIN_CHUNK_TOKENS:
        raise ValueError(f"--chunk-tokens must be at least {MIN_CHUNK_TOKENS}, got {args.chunk_tokens}")
    files = find_files(args.paths)
    engine = _engine(args)
    if args.chunk_tokens > engine.lm.context_limit:
        raise ValueError(f"--chunk-tokens {args.chunk_tokens} exceeds {engine.lm.name}'s {engine.lm.context_limit}")
    builder = engine.builder
    chunks = [
        builder.tokenize(chunk, "document")
        for f in files
        for chunk in document_chunks(builder, f.read_text(encoding="utf-8", errors="replace"), args.chunk_tokens)
    ]
    with tqdm(total=sum(map(len, chunks)), unit="tok", desc="ingest", disable=None) as bar:
        report = ingest(engine.chunks, chunks, progress=bar.update)
    summary = {"files": len(files), **asdict(report), "seconds": round(report.seconds, 3)}
    summary["tier_stats"] = [asdict(s) for s in engine.chunks.store.stats()]
    if args.json:
        print(json.dumps(summary))
    else:
        rate = report.computed_tokens / report.seconds if report.seconds else 0.0
        print(
            f"{len(files)} files, {report.chunks} chunks, {report.tokens} tokens: "
            f"{report.stored} stored, {report.skipped} already stored, {report.failed} not stored; "
            f"{report.seconds:.1f} s ({rate:.0f} tok/s computed)"
        )
    engine.chunks.store.close()
    return 0


# --- store ---------------------------------------------------------------------------------------------


def _open(args):
    from kvstash.store import StoreConfig, open_store

    return open_store(args.store, StoreConfig(_ADMIN_FINGERPRINT))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _table(rows: list[dict], columns: tuple[str, ...]) -> str:
    """A plain fixed-width table: the tier column, then ``columns``."""
    cells = [["tier", *columns]] + [[str(r["tier"]), *(_cell(c, r[c]) for c in columns)] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for row in cells:
        tier, *rest = row
        lines.append("  ".join([tier.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))]))
    return "\n".join(lines)


def _cell(column: str, value) -> str:
    if column == "bytes":
        return _human(value)
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _stat_rows(store) -> list[dict]:
    return [{"tier": s.name, **asdict(s), "hit_rate": round(s.hit_rate, 4)} for s in store.stats()]


def cmd_stats(args) -> int:
    with _open(args) as store:
        if args.verify:
            store.verify()
        rows = _stat_rows(store)
    print(json.dumps(rows) if args.json else _table(rows, _STAT_COLUMNS))
    return 0


def _describe(tier, key: str) -> dict | None:
    """What one record holds (reads and checks it, leaving LRU order alone); None if it vanished."""
    from kvstash.store import CorruptRecord, decode_record

    blob = tier._read(key, touch=False)  # Tier has no public call for a blob by key alone
    if blob is None:
        return None
    row = {"tier": tier.name, "key": key, "bytes": len(blob)}
    try:
        rec = decode_record(blob, expect_key=key)
    except CorruptRecord as e:
        return row | {"corrupt": e.reason}
    start = int(rec.chunk.positions[0]) if rec.chunk.num_tokens else 0
    return row | {"tokens": rec.chunk.num_tokens, "start": start, "codec": rec.codec, "model": rec.model_fingerprint}


def _ls_line(r: dict) -> str:
    if "corrupt" in r:
        extra = f"  {_human(r['bytes'])}  CORRUPT ({r['corrupt']})"
    elif "tokens" in r:
        extra = f"  {r['tokens']} tok from {r['start']}  {_human(r['bytes'])}  {r['codec']}  {r['model']}"
    else:
        extra = ""
    return f"{r['tier']:<6} {r['key']}{extra}"


def cmd_ls(args) -> int:
    with _open(args) as store:
        if args.long:
            rows = [_describe(t, k) for t in store.tiers for k in t.keys()]  # noqa: SIM118 - not a dict
            rows = [r for r in rows if r is not None]
        else:
            rows = [{"tier": t.name, "key": k} for t in store.tiers for k in t.keys()]  # noqa: SIM118
    if args.json or rows:
        print(json.dumps(rows) if args.json else "\n".join(map(_ls_line, rows)))
    return 0


def cmd_verify(args) -> int:
    with _open(args) as store:
        results = store.verify()
        rows = [
            {"tier": t.name, "checked": v.checked, "ok": v.ok, "corrupt": v.removed, "errors": t.stats().errors}
            for t, v in zip(store.tiers, results, strict=True)
        ]
    print(json.dumps(rows) if args.json else _table(rows, ("checked", "ok", "corrupt", "errors")))
    return 0


def cmd_gc(args) -> int:
    with _open(args) as store:
        removed = [t.gc() for t in store.tiers]
        rows = [{"removed": n, **r} for n, r in zip(removed, _stat_rows(store), strict=True)]
    print(json.dumps(rows) if args.json else _table(rows, ("removed", "entries", "bytes", "evictions")))
    return 0


def cmd_clear(args) -> int:
    if not args.yes:
        raise ValueError(f"store clear removes every record in {args.store}; add --yes to do it")
    with _open(args) as store:
        before = _stat_rows(store)
        store.clear()
        rows = [{"tier": r["tier"], "removed": r["entries"], "bytes": r["bytes"]} for r in before]
    print(json.dumps(rows) if args.json else _table(rows, ("removed", "bytes")))
    return 0


# --- parser --------------------------------------------------------------------------------------------


def register(sub) -> None:
    """Add the ``ingest`` and ``store`` commands to the top-level subparsers ``sub``."""
    p = sub.add_parser(
        "ingest",
        help="precompute the KV of documents into a chunk store",
        description="Split files into chunks of at most --chunk-tokens tokens (at paragraph, then sentence "
        "boundaries), compute each chunk's KV as a document and put it in the store; chunks already "
        "stored are skipped. Directories are walked for .txt and .md files. Pass the same chunks as "
        "documents to reuse them (kvstash.chunking.split_text); `ask --doc FILE` reuses a file that "
        "fits in one chunk.",
    )
    p.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="files, or directories to walk")
    p.add_argument("--store", required=True, metavar="SPEC", help=_STORE_HELP)
    p.add_argument("--chunk-tokens", type=int, default=512, help="most tokens per chunk (default 512)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or local HF directory (default {DEFAULT_MODEL})")
    p.add_argument("--codec", default="fp16", help="how chunk KV is stored: fp16 (default), bf16, fp32, kivi8/4/2")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON summary instead of text")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "store",
        help="inspect and maintain a chunk store",
        description="Look after the chunk store a spec names. These commands act on every record, "
        "whatever model or codec wrote it. Hit and miss counters belong to the process that "
        "counts them, and a ram tier lives only inside the process that holds it.",
    )
    actions = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    specs = [
        ("stats", cmd_stats, "per-tier entries, bytes and counters", f"Print per tier: {', '.join(_STAT_COLUMNS)}."),
        ("ls", cmd_ls, "list the stored chunks", "List each tier's keys; --long reads every record."),
        ("verify", cmd_verify, "check every record, remove corrupt ones",
         "Read and check every record of every tier; remove and count the corrupt ones."),
        ("gc", cmd_gc, "apply byte budgets, remove stale temp files",
         "Rescan disk tiers, remove stale temp files and evict least recently used records down to each budget."),
        ("clear", cmd_clear, "remove every record (needs --yes)", "Remove every record of every tier."),
    ]  # fmt: skip
    for name, func, help_text, description in specs:
        q = actions.add_parser(name, help=help_text, description=description)
        q.add_argument("--store", required=True, metavar="SPEC", help=_STORE_HELP)
        q.add_argument("--json", action="store_true", help="print JSON instead of text")
        q.set_defaults(func=func)
        if name == "stats":
            q.add_argument("--verify", action="store_true", help="check every record first, so corrupt ones count")
        if name == "ls":
            q.add_argument("--long", action="store_true", help="also read each record: tokens, bytes, codec, model")
        if name == "clear":
            q.add_argument("--yes", action="store_true", help="really remove everything")
