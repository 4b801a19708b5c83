"""kvstash ingest and kvstash store: reuse through disk and Redis stores, corruption, outages, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from kvstash.cli import build_parser, main
from kvstash.engine import Engine
from kvstash.store import decode_record
from tests.redis_server import (
    redis_url,  # noqa: F401
    skip_without_redis,
    start_server,
)

DOC = (
    "The Harbor Lantern Society was founded in 1887 in the port town of Velmora. Its members kept a lamp "
    "burning on the north pier every night for ninety years. The society's last president was Ada Quill, "
    "a ship's carpenter, who closed it in 1977 when an electric beacon replaced the lamp."
)


QUESTION = "Who was the last president of the Harbor Lantern Society?"


@pytest.fixture
def cli(engine, monkeypatch, capsys) -> Callable[..., dict | list]:
    """Run ``kvstash ARGS --json`` in-process on the session's loaded model; returns the parsed JSON."""
    monkeypatch.setattr("kvstash.engine.load_model", lambda name, dtype: engine.lm)

    def run(*argv: str) -> dict | list:
        capsys.readouterr()
        code = main([*argv, "--json"])
        out = capsys.readouterr()
        assert code == 0, out.err
        return json.loads(out.out)

    return run


def _ask(cli, doc: Path, store: str) -> dict:
    return cli("ask", QUESTION, "--doc", str(doc), "--store", store, "--max-tokens", "12")


def _damage(blob: bytes, i: int) -> bytes:
    """Every other record truncated, the rest with 8 bytes in the middle changed (still damaged if done twice)."""
    if i % 2:
        return blob[: len(blob) // 2]
    mid = len(blob) // 2
    return blob[:mid] + bytes((b + 1) % 256 for b in blob[mid : mid + 8]) + blob[mid + 8 :]


def _corrupt_disk(root: Path) -> int:
    files = sorted(root.glob("*.kv"))
    for i, f in enumerate(files):
        f.write_bytes(_damage(f.read_bytes(), i))
    return len(files)


def _corrupt_redis(url: str, prefix: str) -> int:
    client = redis.Redis.from_url(url)
    keys = sorted(k for k in client.scan_iter(match=prefix + "*") if b"@" not in k)  # not the counters hash
    for i, k in enumerate(keys):
        client.set(k, _damage(client.get(k), i))
    client.close()
    return len(keys)


def _check_store_flow(cli, doc: Path, store: str, tier: str, corrupt: Callable[[], int]) -> None:
    first = _ask(cli, doc, store)
    assert first["reused_tokens"] == 0 and first["computed_tokens"] > 0
    second = _ask(cli, doc, store)
    assert second["reused_tokens"] > 0 and second["tier_hits"].get(tier, 0) > 0
    assert second["computed_tokens"] < first["computed_tokens"]
    assert second["answer"] == first["answer"]

    assert corrupt() > 0
    third = _ask(cli, doc, store)  # every record damaged: all misses, recomputed, stored again
    assert third["answer"] == first["answer"] and third["reused_tokens"] == 0

    n = corrupt()
    (row,) = cli("store", "verify", "--store", store)
    assert (row["tier"], row["checked"], row["corrupt"], row["ok"]) == (tier, n, n, 0)

    _ask(cli, doc, store)
    (before,) = cli("store", "stats", "--store", store)  # counters are kept with the tier: every run's
    n = corrupt()
    (row,) = cli("store", "stats", "--verify", "--store", store)
    assert (row["tier"], row["corrupt"], row["entries"]) == (tier, before["corrupt"] + n, 0)


def test_disk_store_reuse_and_corruption(cli, tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    root = tmp_path / "kv"
    _check_store_flow(cli, doc, f"disk:{root}", "disk", lambda: _corrupt_disk(root))


@pytest.mark.redis
def test_redis_store_reuse_and_corruption(cli, tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    prefix = f"kvstash-cli-{uuid.uuid4().hex[:8]}:"
    store = f"{redis_url}?prefix={prefix}"
    _check_store_flow(cli, doc, store, "redis", lambda: _corrupt_redis(redis_url, prefix))


@pytest.mark.redis
def test_engine_answers_through_a_redis_outage(engine) -> None:
    skip_without_redis()
    server = start_server()
    try:
        eng = Engine(loaded=engine.lm, store=server.url)
        first = eng.ask(QUESTION, [DOC], max_tokens=12, reuse="blend")
        server.stop()  # mid-run: the engine keeps its store object, the server is gone
        down = eng.ask(QUESTION, [DOC], max_tokens=12, reuse="blend")
        assert down.text == first.text and down.prefill.reused_tokens == 0
        (stats,) = eng.chunks.store.stats()
        assert stats.errors > 0
        server.start()  # back at the same URL: stored again, then reused
        time.sleep(1.1)  # the tier fails fast for retry_interval (1 s) after an error
        eng.ask(QUESTION, [DOC], max_tokens=12, reuse="blend")
        again = eng.ask(QUESTION, [DOC], max_tokens=12, reuse="blend")
        assert again.text == first.text and again.prefill.reused_tokens > 0
    finally:
        server.cleanup()


def test_ingest_stores_the_keys_ask_looks_up(cli, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    long_text = "\n\n".join([DOC, DOC.replace("Harbor", "Valley").replace("1887", "1902")])
    (docs / "a.txt").write_text(long_text)  # two paragraphs of ~70 tokens: two chunks of <= 96
    (docs / "sub" / "b.md").write_text("# Note\n\nThe beacon at Velmora is painted green.")
    (docs / "skip.bin").write_bytes(b"\x00\x01")
    store = f"disk:{tmp_path / 'kv'}"
    first = cli("ingest", str(docs), "--store", store, "--chunk-tokens", "96")
    assert (first["files"], first["chunks"], first["stored"], first["skipped"]) == (2, 3, 3, 0)
    second = cli("ingest", str(docs), "--store", store, "--chunk-tokens", "96")
    assert (second["stored"], second["skipped"], second["tokens"]) == (0, 3, first["tokens"])
    # b.md fits in one chunk, so asking with it as a document reuses the ingested KV
    out = cli("ask", "What color is the beacon?", "--doc", str(docs / "sub" / "b.md"), "--store", store)
    (doc_seg,) = [s for s in out["segments"] if s["kind"] == "document"]
    assert doc_seg["tier"] == "disk" and doc_seg["reused"] == doc_seg["tokens"]
    listed = cli("store", "ls", "--long", "--store", store)
    assert len(listed) == 3 + 3  # the three chunks, plus the prompt head ask cached (glue, system, glue)
    assert all(r["codec"] == "fp16" for r in listed)


def test_clear_needs_yes_and_bad_input_exits_2(tmp_path: Path, capsys) -> None:
    root = tmp_path / "kv"
    root.mkdir()
    (root / "0123abcd.kv").write_bytes(b"not a record")
    assert main(["store", "clear", "--store", f"disk:{root}"]) == 2
    assert "--yes" in capsys.readouterr().err and (root / "0123abcd.kv").exists()
    assert main(["store", "stats", "--store", "floppy:1GB"]) == 2
    assert "bad tier 'floppy:1GB'" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "missing"), "--store", f"disk:{root}"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["store", "clear", "--store", f"disk:{root}", "--yes"]) == 0
    assert not list(root.iterdir())


def _fresh(*argv: str) -> subprocess.CompletedProcess:
    """Run ``python ARGV`` in a new process (this process's niceness, the repo on the path)."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def _fresh_stats(store: str) -> list[dict]:
    return json.loads(_fresh("-m", "kvstash.cli", "store", "stats", "--store", store, "--json").stdout)


def _expected_per_codec(root: Path) -> dict[str, float]:
    """bytes per token of each codec's records, decoded in full here (the stats read headers only)."""
    sizes: dict[str, list[int]] = {}
    for f in root.glob("*.kv"):
        rec = decode_record(f.read_bytes())
        acc = sizes.setdefault(rec.codec, [0, 0])
        acc[0], acc[1] = acc[0] + f.stat().st_size, acc[1] + rec.chunk.num_tokens
    return {codec: b / t for codec, (b, t) in sizes.items()}


def test_stats_in_a_fresh_process_read_the_records(cli, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(DOC)
    store = f"disk:{tmp_path / 'kv'}"
    for codec in ("fp16", "kivi4"):
        assert cli("ingest", str(docs), "--store", store, "--codec", codec)["stored"] == 1
    (row,) = _fresh_stats(store)
    want = _expected_per_codec(tmp_path / "kv")
    assert sorted(row["codecs"]) == ["fp16", "kivi4"] and row["entries"] == 2
    for codec, bpt in want.items():
        assert row["codecs"][codec]["bytes_per_token"] == pytest.approx(bpt, rel=1e-12)
        assert row["codecs"][codec]["entries"] == 1
    assert row["codecs"]["kivi4"]["bytes_per_token"] < row["codecs"]["fp16"]["bytes_per_token"] / 3
    assert row["bytes_per_token"] == pytest.approx(row["bytes"] / row["tokens"], rel=1e-12)
    assert (row["counters"], row["puts"], row["hits"]) == ("shared", 2, 0)
    text = _fresh("-m", "kvstash.cli", "store", "stats", "--store", store).stdout
    assert "per codec" in text and "kivi4" in text and "every process's" in text


def test_corrupt_found_by_one_process_shows_in_another(cli, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(DOC)
    root = tmp_path / "kv"
    store = f"disk:{root}"
    cli("ingest", str(docs), "--store", store)
    (record,) = root.glob("*.kv")
    tokens = decode_record(record.read_bytes()).chunk.token_ids
    record.write_bytes(_damage(record.read_bytes(), 0))
    reader = (  # a reader that exits without closing its tier: counts are pushed at exit
        "import json, sys; from kvstash.store import DiskTier, StoreConfig; "
        "t = DiskTier(StoreConfig('m'), sys.argv[1]); assert t.get(sys.argv[2], json.loads(sys.argv[3])) is None"
    )
    _fresh("-c", reader, str(root), record.stem, json.dumps(tokens))
    assert not record.exists()
    (row,) = _fresh_stats(store)
    assert (row["corrupt"], row["misses"], row["entries"], row["errors"]) == (1, 1, 0, 0)


def test_ram_stats_say_their_counters_are_this_process_s(capsys) -> None:
    assert main(["store", "stats", "--store", "ram"]) == 0
    assert "except ram: this process's only" in capsys.readouterr().out
    assert main(["store", "stats", "--store", "ram", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["tier"], row["counters"], row["entries"], row["bytes_per_token"]) == ("ram", "process", 0, 0.0)


@pytest.mark.parametrize(
    "argv", [["ingest"], ["store"], *[["store", a] for a in ("stats", "ls", "verify", "gc", "clear")]]
)
def test_help(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out
