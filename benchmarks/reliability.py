"""Reliability: the server and the store under hostile input, concurrency, crashes, outages, a full disk and
corrupted records. Prints a markdown table and JSON (``--out FILE`` writes the JSON too).

    nice -n 19 .venv/bin/python benchmarks/reliability.py            # every check at full size, ~10 min
    nice -n 19 .venv/bin/python benchmarks/reliability.py --quick    # small sizes, ~2 min

Checks (all greedy, model in float32 so answers can be compared exactly):

- ``hostile``: N generated malformed or hostile requests (:mod:`hostile`) -> responses >= 500 (must be 0);
  the server still answers /health and a chat afterwards.
- ``concurrent``: C clients x R short chats at once -> errors, answers that differ from the same request
  sent alone (both must be 0).
- ``kill -9 ingest``: ``kvstash ingest`` into a disk tier killed at a random moment, K times ->
  ``kvstash store verify`` finds no partial record; every record left equals an uninterrupted run's.
- ``redis outage``: clients chat about registered documents while Redis is killed and restarted empty ->
  every request answered, no document lost, the tier writes to Redis again without restarting kvstash.
- ``cluster outage``: the same over a 3-node Redis Cluster, the node holding a document ``kill -9``-ed and
  restarted empty.
- ``disk full``: a disk tier on a tmpfs smaller than a few records (a byte budget smaller than a record
  where mounting fails) -> a warning, no corrupt record, answers equal those without the disk tier.
- ``corrupt records``: every record of a disk and a Redis tier, fp16 and kivi4, damaged (bit flips,
  truncation, zeros, another record's bytes) -> answers equal those computed without a store.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path

import httpx
import redis
from redis.cluster import RedisCluster

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from hostile import hostile_requests, send_all  # noqa: E402

import kvstash  # noqa: E402
from kvstash.cli.main import main as kvstash_main  # noqa: E402
from kvstash.engine import Engine  # noqa: E402
from kvstash.model.registry import load_model  # noqa: E402
from kvstash.store import decode_record  # noqa: E402
from tests.redis_cluster import RedisClusterProcesses  # noqa: E402
from tests.redis_server import start_server  # noqa: E402
from tests.server.test_app import ServerProcess, start_servers  # noqa: E402

DEMO_DOCS = sorted((Path(kvstash.__file__).parent / "demo_docs").glob("*.txt"))
QUESTIONS = ["Who is this about? Answer in one sentence.", "What happened first?", "Give one number from the text."]
FULL = {"hostile": 1000, "clients": 8, "per_client": 50, "kills": 20, "outage_s": 30, "questions": 3}
QUICK = {"hostile": 100, "clients": 4, "per_client": 5, "kills": 2, "outage_s": 8, "questions": 2}


def _chat(url: str, question: str, docs: list[str] = (), max_tokens: int = 6) -> tuple[int, str | None]:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}
    try:
        r = httpx.post(url + "/v1/chat/completions", json=body | {"documents": list(docs)}, timeout=300)
    except httpx.HTTPError as e:
        return 0, str(e)
    return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " "))


# --- the server -------------------------------------------------------------------------------------


def check_hostile(url: str, n: int, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    res = send_all(url, hostile_requests(n, seed))
    healthy = httpx.get(url + "/health").status_code == 200 and _chat(url, "Hi", max_tokens=2)[0] == 200
    statuses = {str(k): v for k, v in sorted(res.statuses.items())}
    return {"requests": n, "errors_5xx": res.errors_5xx, "statuses": statuses, "server_errors": res.server_errors,
            "healthy_after": healthy, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def check_concurrent(url: str, clients: int, per_client: int) -> dict:
    questions = [f"What is {a} plus {b}? Answer with the number." for a in range(3, 7) for b in (2, 5, 9, 11)]
    jobs = [questions[(c * per_client + j) % len(questions)] for c in range(clients) for j in range(per_client)]
    alone = {q: _chat(url, q) for q in dict.fromkeys(jobs)}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        together = list(pool.map(_chat, [url] * len(jobs), jobs))
    seconds = time.perf_counter() - t0
    errors = sum(status != 200 for status, _ in together) + sum(status != 200 for status, _ in alone.values())
    differ = sum(answer != alone[q][1] for q, (_, answer) in zip(jobs, together, strict=True))
    return {"clients": clients, "requests": len(jobs), "errors": errors, "differ_from_alone": differ,
            "requests_per_s": round(len(jobs) / seconds, 2)}  # fmt: skip


def check_redis_outage(work: Path, clients: int, seconds: float, seed: int = 0) -> dict:
    """Chats naming registered documents from ``clients`` threads; Redis is killed a quarter of the way in
    and restarted empty at half time."""
    rds = start_server()
    try:
        return _outage(rds.url, redis.Redis.from_url(rds.url), rds.stop, rds.start, clients, seconds, seed)
    finally:
        rds.cleanup()


def check_cluster_outage(work: Path, clients: int, seconds: float, seed: int = 0) -> dict:
    """The same over a 3-node Redis Cluster: the node that holds the first document is killed (``kill -9``) a
    quarter of the way in and restarted empty (no persistence; its cluster config kept) at half time."""
    cluster = RedisClusterProcesses()
    cluster.start()
    state: dict = {}
    client = RedisCluster.from_url("redis://" + cluster.url.removeprefix("redis+cluster://").split(",")[0])

    def kill() -> None:
        node = state["node"] = cluster.node_of(f"kvstash-docs:kvstash:{state['ids'][0]}")
        node._proc.kill()  # SIGKILL: no shutdown, no goodbye to the cluster
        node._proc.wait()
        node._proc = None

    def restart() -> None:
        state["node"].start()
        cluster.wait_ok()

    try:
        out = _outage(cluster.url, client, kill, restart, clients, seconds, seed, state)
        return {**out, "killed_node": state["node"].port}
    finally:
        client.close()
        cluster.cleanup()


def _outage(spec: str, client, kill, restart, clients: int, seconds: float, seed: int, state: dict | None = None):
    """Clients chat about registered documents through a server on ``ram,<spec>``; ``kill`` at a quarter of
    ``seconds``, ``restart`` (empty) at half time; then :func:`_outage_after`."""
    server = ServerProcess("--shutdown-timeout", "3", "--dtype", "float32", "--store", f"ram,{spec}")
    try:
        start_servers(server)
        url = server.url
        ids = [httpx.post(url + "/v1/documents", json={"text": p.read_text()}, timeout=300).json()["id"]
               for p in DEMO_DOCS]  # fmt: skip
        if state is not None:
            state["ids"] = ids
        results: list[int] = []
        stop = threading.Event()

        def chat(i: int) -> None:
            rng = random.Random(seed + i)
            while not stop.is_set():
                results.append(_chat(url, rng.choice(QUESTIONS), [rng.choice(ids)], max_tokens=4)[0])

        threads = [threading.Thread(target=chat, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(seconds / 4)
        kill()
        time.sleep(seconds / 4)
        restart()
        time.sleep(seconds / 2)
        stop.set()
        for t in threads:
            t.join()
        return _outage_after(url, client, ids, results)
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)


def _outage_after(url: str, client, ids: list[str], results: list[int]) -> dict:
    """What the outage left: every document still served and back in Redis; a new one's KV in Redis.
    ``client``: a redis-py client of the store's Redis (or Redis Cluster)."""
    lost = sum(httpx.get(f"{url}/v1/documents/{i}").status_code != 200 for i in ids)
    lost += sum(not client.exists(f"kvstash-docs:kvstash:{i}") for i in ids)
    new = httpx.post(url + "/v1/documents", json={"text": "A new note, written after Redis came back."}, timeout=300)
    reconnected = new.status_code == 200 and any(client.scan_iter(match="kvstash:*"))
    return {"requests": len(results), "not_answered": sum(s != 200 for s in results), "documents_lost": lost,
            "tier_reconnected": reconnected, "fallbacks": _metric(url, "kvstash_registry_fallbacks_total"),
            "writebacks": _metric(url, "kvstash_registry_writebacks_total")}  # fmt: skip


# --- crashes and the store ----------------------------------------------------------------------------


def _ingest_cmd(corpus: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "kvstash.cli", "ingest", str(corpus), "--store", f"disk:{store}",
            "--chunk-tokens", "16", "--dtype", "float32", "--json"]  # fmt: skip


def _corpus(work: Path, facts: int) -> Path:
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for p in DEMO_DOCS:
        (corpus / p.name).write_text(p.read_text())
    text = "\n\n".join(f"Fact {i}: river {i} is {3 * i + 7} km long and has {i % 5 + 1} bridges." for i in range(facts))
    if facts:
        (corpus / "facts.txt").write_text(text)
    return corpus


def check_kill_ingest(work: Path, kills: int, seed: int = 0, facts: int = 24) -> dict:
    """``kvstash ingest`` killed with SIGKILL while it writes (once a random number of records is there),
    ``kills`` times, each into its own directory; then ``kvstash store verify`` and a byte comparison with an
    uninterrupted run."""
    rng, corpus = random.Random(seed), _corpus(work, facts)
    t0, first_s = time.perf_counter(), None
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(_ingest_cmd(corpus, work / "reference"), **quiet)
    while proc.poll() is None:
        if first_s is None and any((work / "reference").glob("*.kv")):
            first_s = time.perf_counter() - t0  # the model is loaded: records are being written
        time.sleep(0.05)
    full_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"kvstash ingest exited with {proc.returncode}")
    reference = {p.name: p.read_bytes() for p in (work / "reference").glob("*.kv")}
    records = partial = differ = 0
    for i in range(kills):
        store = work / f"killed-{i}"
        proc = subprocess.Popen(_ingest_cmd(corpus, store), **quiet)
        target = rng.randint(1, max(1, len(reference) - 1))  # kill while writing record number `target`
        while proc.poll() is None and sum(1 for _ in store.glob("*.kv")) < target:
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        out = io.StringIO()
        with redirect_stdout(out):
            kvstash_main(["store", "verify", "--store", f"disk:{store}", "--json"])
        partial += sum(row["corrupt"] for row in json.loads(out.getvalue()))
        for p in store.glob("*.kv"):
            records += 1
            blob = p.read_bytes()
            decode_record(blob, expect_key=p.stem)  # raises CorruptRecord if verify missed one
            differ += blob != reference[p.name]
    return {"kills": kills, "records_at_kill": records, "reference_records": len(reference),
            "partial_records": partial, "records_differ": differ, "full_run_s": round(full_s, 1),
            "writing_from_s": round(first_s or 0.0, 1)}  # fmt: skip


def _answers(engine: Engine, n: int, repeat: int = 1) -> list[str]:
    """``n`` questions over one demo document each, then one over all of them (it reuses their chunks)."""
    docs = [p.read_text() for p in DEMO_DOCS]
    asks = [(q, [docs[i % len(docs)]]) for i, q in enumerate(QUESTIONS[:n])] + [(QUESTIONS[0], docs)]
    return [engine.ask(q, ds, max_tokens=8, reuse="blend").text for _ in range(repeat) for q, ds in asks]


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_disk_full(lm, work: Path, n: int) -> dict:
    """A disk tier on a 2 MiB tmpfs (fp32 records of ~1 MiB); a byte budget smaller than a record when
    mounting is not allowed. Every question asked twice, so later asks read what the disk holds."""
    mnt = work / "tmpfs"
    mnt.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    spec = f"disk:{mnt}" if mounted.returncode == 0 else f"disk:{mnt}:1KiB"
    ref = _answers(Engine(loaded=lm, store="ram", codec="fp32"), n, repeat=2)
    caught = _Warnings()
    logging.getLogger("kvstash.store").addHandler(caught)
    try:
        with Engine(loaded=lm, store=spec, codec="fp32") as engine:
            got = _answers(engine, n, repeat=2)
            [stats], [verify] = engine.store_stats(), engine.store.verify()
    finally:
        logging.getLogger("kvstash.store").removeHandler(caught)
        if mounted.returncode == 0:
            subprocess.run(["umount", str(mnt)], check=True)
    return {"how": "tmpfs 2MiB" if mounted.returncode == 0 else "budget 1KiB", "asks": len(got),
            "answers_differ": sum(a != b for a, b in zip(got, ref, strict=True)), "records_kept": verify.ok,
            "corrupt": verify.removed, "writes_failed": stats.errors + stats.rejected,
            "warnings": sorted(set(caught.messages))}  # fmt: skip


def _damage(blob: bytes, how: int, other: bytes) -> bytes:
    mid = len(blob) // 2
    return [
        blob[:mid] + bytes([blob[mid] ^ 0x10]) + blob[mid + 1 :],  # one bit of the payload
        blob[:mid],  # truncated
        bytes(len(blob)),  # zeros
        other,  # another record's bytes under this key
        blob[:20] + bytes([blob[20] ^ 0xFF]) + blob[21:],  # the header
        blob[:-1] + bytes([blob[-1] ^ 1]),  # the checksum
    ][how % 6]


def _corrupt_all(root: Path | None, redis_url: str, prefix: str) -> int:
    if root is not None:
        paths = sorted(root.glob("*.kv"))
        blobs = [p.read_bytes() for p in paths]
        for i, p in enumerate(paths):
            p.write_bytes(_damage(blobs[i], i, blobs[i - 1]))
        return len(paths)
    client = redis.Redis.from_url(redis_url)
    keys = sorted(k for k in client.scan_iter(match=prefix + "*") if b"@" not in k)
    blobs = [client.get(k) for k in keys]
    for i, k in enumerate(keys):
        client.set(k, _damage(blobs[i], i, blobs[i - 1]))
    return len(keys)


def check_corruption(lm, work: Path, redis_url: str, n: int) -> dict:
    """Per tier and codec: the asks on an empty store (which computes, stores, and reuses within the run), every
    record damaged, the same asks again. A damaged record must be found and recomputed, so the answers equal the
    empty store's (``wrong_answers``); ``differ_from_no_store`` counts answers that differ from a store-less
    run's only because a chunk recomputed in the run was reused through the codec (kivi4 is lossy)."""
    no_store = _answers(Engine(loaded=lm, store="ram:1KiB"), n)  # ram:1KiB holds no record
    rows = {}
    for codec in ("fp16", "kivi4"):
        for tier in ("disk", "redis"):
            root, prefix = (work / f"corrupt-{codec}", "") if tier == "disk" else (None, f"rel-{codec}:")
            spec = f"disk:{root}" if root is not None else f"{redis_url}?prefix={prefix}"
            with Engine(loaded=lm, store=spec, codec=codec) as engine:
                empty = _answers(engine, n)
                damaged = _corrupt_all(root, redis_url, prefix)
                got = _answers(engine, n)
                [stats] = engine.store_stats()
            differ = [sum(a != b for a, b in zip(got, ref, strict=True)) for ref in (empty, no_store)]
            rows[f"{tier} {codec}"] = {"records_damaged": damaged, "found_corrupt": stats.corrupt,
                                       "wrong_answers": differ[0], "differ_from_no_store": differ[1]}  # fmt: skip
    return {"asks": len(no_store), "tiers": rows, "wrong_answers": sum(r["wrong_answers"] for r in rows.values())}


# --- the report ---------------------------------------------------------------------------------------


def _rows(r: dict) -> list[tuple[str, str, str, bool]]:
    """(check, size, result, passed) per check."""
    h, c, k, d, x = (r[n] for n in ("hostile", "concurrent", "kill_ingest", "disk_full", "corrupt"))
    return [
        ("hostile requests", f"{h['requests']}", f"{h['errors_5xx']} responses >= 500, healthy after: "
         f"{h['healthy_after']}", h["errors_5xx"] == 0 and h["healthy_after"]),
        ("concurrent clients", f"{c['clients']} x {c['requests'] // c['clients']}", f"{c['errors']} errors, "
         f"{c['differ_from_alone']} answers differ from alone", c["errors"] == 0 and c["differ_from_alone"] == 0),
        ("kill -9 ingest", f"{k['kills']} kills", f"{k['partial_records']} partial records, {k['records_differ']} of "
         f"{k['records_at_kill']} records differ", k["partial_records"] == 0 and k["records_differ"] == 0),
    ] + [
        (what, f"{o['requests']} requests", f"{o['not_answered']} not answered, {o['documents_lost']} documents "
         f"lost, reconnected: {o['tier_reconnected']}",
         o["not_answered"] == 0 and o["documents_lost"] == 0 and o["tier_reconnected"])
        for what, o in (("Redis killed, restarted empty", r["redis_outage"]),
                        ("Redis Cluster node killed (-9), restarted empty", r["cluster_outage"]))
    ] + [
        ("disk full", f"{d['how']}, {d['asks']} asks", f"{d['answers_differ']} answers differ, {d['corrupt']} "
         f"corrupt, {d['writes_failed']} writes failed, warned: {bool(d['warnings'])}",
         d["answers_differ"] == 0 and d["corrupt"] == 0 and bool(d["warnings"])),
        ("every record corrupted", f"{len(x['tiers'])} tier/codecs x {x['asks']} asks",
         f"{x['wrong_answers']} wrong answers", x["wrong_answers"] == 0),
    ]  # fmt: skip


def run_all(sizes: dict, work: Path, seed: int) -> dict:
    """Every check; each one's figures are also printed as one JSON line (to stderr) as soon as it is done."""
    out: dict = {"sizes": sizes}

    def done(name: str, figures: dict) -> None:
        out[name] = figures
        print(json.dumps({name: figures}), file=sys.stderr, flush=True)

    server = ServerProcess("--shutdown-timeout", "3", "--dtype", "float32")
    start_servers(server)
    try:
        done("hostile", check_hostile(server.url, sizes["hostile"], seed))
        done("concurrent", check_concurrent(server.url, sizes["clients"], sizes["per_client"]))
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)
    done("kill_ingest", check_kill_ingest(work / "ingest", sizes["kills"], seed))
    done("redis_outage", check_redis_outage(work, 4, sizes["outage_s"], seed))
    done("cluster_outage", check_cluster_outage(work, 4, sizes["outage_s"], seed))
    lm = load_model("smollm2-135m")
    done("disk_full", check_disk_full(lm, work / "disk-full", sizes["questions"]))
    rds = start_server()
    try:
        done("corrupt", check_corruption(lm, work / "corrupt", rds.url, sizes["questions"]))
    finally:
        rds.cleanup()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (~2 min) instead of the full run (~10 min)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvstash-reliability-") as work:
        result = run_all(QUICK if args.quick else FULL, Path(work), args.seed)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    rows = _rows(result)
    print("| check | size | result | pass |\n|---|---|---|---|")
    for check, size, text, ok in rows:
        print(f"| {check} | {size} | {text} | {'yes' if ok else '**NO**'} |")
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
