"""``kvstash store stats|ls|verify|gc|clear``: look after a chunk store.

Argument parsing and printing only; the work is in :mod:`kvstash.store`.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from kvstash.cli.args import STORE_HELP

# The store commands act on every record whatever model or codec wrote it, so they open the tiers with
# a placeholder config; it is never used to read or write a chunk.
_ADMIN_FINGERPRINT = "kvstash-store-admin"
_STAT_COLUMNS = ("entries", "bytes", "tokens", "bytes_per_token", "hits", "misses", "evictions", "corrupt", "errors")
_CODEC_COLUMNS = ("entries", "bytes", "tokens", "bytes_per_token")


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


def _stats_text(rows: list[dict]) -> str:
    """The per-tier table, a table per codec when there are records, and where the counters come from."""
    parts = [_table(rows, _STAT_COLUMNS)]
    codec_rows = [{"tier": f"{r['tier']} {c}", **u} for r in rows for c, u in r["codecs"].items()]
    if codec_rows:
        parts.append("\nper codec (from the records' headers):\n" + _table(codec_rows, _CODEC_COLUMNS))
    unreadable = [f"{r['tier']}: {r['unreadable']}" for r in rows if r["unreadable"]]
    if unreadable:
        parts.append(f"records with an unreadable header ({', '.join(unreadable)}): run store verify")
    local = [r["tier"] for r in rows if r["counters"] == "process"]
    parts.append(
        "entries, bytes and tokens are read from the records; hits, misses, evictions, corrupt and errors "
        "are every process's, kept with the tier"
        + (f" (except {', '.join(local)}: this process's only)" if local else "")
    )
    return "\n".join(parts)


def cmd_stats(args) -> int:
    with _open(args) as store:
        if args.verify:
            store.verify()
        rows = _stat_rows(store)
    print(json.dumps(rows) if args.json else _stats_text(rows))
    return 0


def _describe(tier, key: str) -> dict | None:
    """What one record holds (reads and checks it, leaving LRU order alone); None if it vanished."""
    from kvstash.store import CorruptRecord, decode_record

    blob = tier.blob(key)
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
    """Add the ``store`` command to the top-level subparsers ``sub``."""
    p = sub.add_parser(
        "store",
        help="inspect and maintain a chunk store",
        description="Look after the chunk store a spec names. These commands act on every record, "
        "whatever model or codec wrote it. Stats read entries, bytes and tokens from the records; hit, "
        "miss, corrupt, eviction and error counters are kept with a disk, redis or redis-cluster tier, so "
        "they add up every process's. A ram tier (and its counters) lives only inside its process.",
    )
    actions = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    specs = [
        ("stats", cmd_stats, "per-tier entries, bytes, tokens and counters",
         f"Print per tier: {', '.join(_STAT_COLUMNS)}; then per codec: {', '.join(_CODEC_COLUMNS)}."),
        ("ls", cmd_ls, "list the stored chunks", "List each tier's keys; --long reads every record."),
        ("verify", cmd_verify, "check every record, remove corrupt ones",
         "Read and check every record of every tier; remove and count the corrupt ones."),
        ("gc", cmd_gc, "apply byte budgets, remove stale temp files",
         "Rescan disk tiers, remove stale temp files and evict least recently used records down to each budget."),
        ("clear", cmd_clear, "remove every record (needs --yes)", "Remove every record of every tier."),
    ]  # fmt: skip
    for name, func, help_text, description in specs:
        q = actions.add_parser(name, help=help_text, description=description)
        q.add_argument("--store", required=True, metavar="SPEC", help=STORE_HELP)
        q.add_argument("--json", action="store_true", help="print JSON instead of text")
        q.set_defaults(func=func)
        if name == "stats":
            q.add_argument("--verify", action="store_true", help="check every record first, so corrupt ones count")
        if name == "ls":
            q.add_argument("--long", action="store_true", help="also read each record: tokens, bytes, codec, model")
        if name == "clear":
            q.add_argument("--yes", action="store_true", help="really remove everything")
