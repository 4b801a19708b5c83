"""Serving under load: kvstash's server (batched, one at a time, blend, full) next to llama.cpp's llama-server.

    .venv/bin/python benchmarks/serving.py --out out/serving            # everything below, ~30 min
    .venv/bin/python benchmarks/serving.py --configs blend,full --workloads chat --levels 1,8
    .venv/bin/python benchmarks/serving.py --configs blend,blend+spec --levels 1,8   # speculation in the batch

Each server config starts as its own process on the same machine (2 threads). Workloads, the same requests
in the same order for every config:

- ``rag``: questions from MuSiQue, each naming 4-8 of its own passages (4-5K-token prompts) in a shuffled
  order, 32-token answers. kvstash gets the passages registered once through ``/v1/documents`` (their KV
  computed before the clock starts: a warm store) and named in the ``documents`` field; llama-server gets
  them inline in the user message after the same system prompt, with its prompt cache on.
- ``chat``: chat requests without documents (an instruction and an NQ question), 64-token answers.

Every answer runs to its max_tokens (``ignore_eos``, sent to both servers, as vLLM's serving benchmark does), so
every config decodes the same number of tokens; ``--natural-length`` lets answers end where the model ends them.

Load: closed loop, C concurrent streaming clients (``--levels``), each sending its next request when the
last one finished; and an open loop with Poisson arrivals (``--rate``). Per level: requests/s, completion
tokens/s, TTFT p50/p90/p99 (request sent -> first content), time per output token p50/p90 (after the
first), errors, the server's peak RSS. All greedy; the share of answers identical to the one-at-a-time
server's is reported. Writes serving.json, serving.md and serving.png to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kvstash.bench.datasets import load_dataset
from kvstash.model.dtype import resolve_dtype
from kvstash.prompt import DEFAULT_SYSTEM

ROOT = Path(__file__).resolve().parent.parent
LLAMA_SERVER = ROOT / ".peers" / "bin" / "llama-server"
CHAT = [
    "Write a long story about a river.", "Describe the history of Rome in detail.",
    "Explain how a car engine works.", "Write a poem about the sea.", "Tell me about the moon and its phases.",
    "How do plants grow from seeds?", "Describe a day in the life of a cat.", "What makes a good friend?",
    "Explain why the sky is blue.", "Give advice to a new student.", "Describe your favourite city.",
    "How does a computer store numbers?", "What is the best way to learn to cook?", "Describe a winter morning.",
    "Why do people travel?", "Explain how bees make honey.",
]  # fmt: skip


@dataclass
class Request:
    key: str
    question: str
    passages: list[str] = field(default_factory=list)
    max_tokens: int = 32
    ignore_eos: bool = True  # answers run to max_tokens (fixed-length answers, as vLLM's serving benchmark)


@dataclass
class Outcome:
    key: str
    sent: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    text: str = ""
    error: str | None = None


# --- servers ------------------------------------------------------------------------------------------------
class Server:
    """A server process on a port: started, health-checked, stopped; its peak RSS read from /proc."""

    name: str
    url: str
    proc: subprocess.Popen | None = None

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} did not become healthy in {timeout:.0f} s")

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Kvstash(Server):
    def __init__(self, name: str, port: int, store: str, args: list[str]):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "kvstash.cli", "serve", "--port", str(port), "--store", store, *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.doc_ids: dict[str, str] = {}

    def register(self, passages: list[str]) -> float:
        t = time.perf_counter()
        for text in passages:
            r = httpx.post(self.url + "/v1/documents", json={"text": text}, timeout=600)
            r.raise_for_status()
            self.doc_ids[text] = r.json()["id"]
        return time.perf_counter() - t

    def body(self, req: Request) -> dict:
        body = {"messages": [{"role": "user", "content": req.question}], "max_tokens": req.max_tokens}
        body["ignore_eos"] = req.ignore_eos
        if req.passages:
            body["documents"] = [self.doc_ids[p] for p in req.passages]
        return body


class LlamaServer(Server):
    def __init__(self, name: str, port: int, gguf: str, parallel: int, ctx: int):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        cmd = [str(LLAMA_SERVER), "-m", gguf, "--port", str(port), "-t", "2", "--parallel", str(parallel),
               "-c", str(ctx * parallel), "--cache-prompt", "--no-webui"]  # fmt: skip
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # busy-waiting threads starve each other on 2 cores
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    def register(self, passages: list[str]) -> float:
        return 0.0

    def body(self, req: Request) -> dict:
        user = "\n\n".join([*(p.strip() for p in req.passages), req.question])
        return {"messages": [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": user}],
                "max_tokens": req.max_tokens, "ignore_eos": req.ignore_eos}  # fmt: skip


# --- load ---------------------------------------------------------------------------------------------------
async def send(client: httpx.AsyncClient, server: Server, req: Request) -> Outcome:
    body = {**server.body(req), "stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
    out = Outcome(req.key, time.perf_counter())
    try:
        async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"{r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = str(chunk["error"])
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text and out.first is None:
                        out.first = time.perf_counter()
                    out.text += text
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.end = time.perf_counter()
    return out


async def closed_loop(server: Server, requests: list[Request], clients: int) -> tuple[list[Outcome], float]:
    queue = list(reversed(requests))
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:

        async def worker() -> None:
            while queue:
                outcomes.append(await send(client, server, queue.pop()))

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return outcomes, time.perf_counter() - t


async def poisson(server: Server, requests: list[Request], rate: float, seed: int) -> tuple[list[Outcome], float]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
        t, tasks = time.perf_counter(), []
        for req in requests:
            tasks.append(asyncio.create_task(send(client, server, req)))
            await asyncio.sleep(rng.expovariate(rate))
        outcomes = await asyncio.gather(*tasks)
        return list(outcomes), time.perf_counter() - t


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o.error is None and o.first is not None]
    ttft = [o.first - o.sent for o in ok]
    tpot = [(o.end - o.first) / (o.tokens - 1) for o in ok if o.tokens > 1]
    return {
        "requests": len(outcomes), "errors": len(outcomes) - len(ok), "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3), "tokens_per_s": round(sum(o.tokens for o in ok) / wall, 1),
        "ttft_p50": pct(ttft, 0.5), "ttft_p90": pct(ttft, 0.9), "ttft_p99": pct(ttft, 0.99),
        "tpot_p50": pct(tpot, 0.5), "tpot_p90": pct(tpot, 0.9),
    }  # fmt: skip


# --- the run ------------------------------------------------------------------------------------------------
def workloads(args) -> dict[str, list[Request]]:
    rng = random.Random(args.seed)
    examples = load_dataset("musique", n=args.rag_examples, passages=10, seed=args.seed)
    rag = []
    total = sum(n for _, n in slices(args).values())
    for i in range(total):
        ex = examples[i % len(examples)]
        k = rng.randint(4, 8)
        rag.append(Request(f"rag{i}", ex.question, rng.sample(ex.documents, k), 32, not args.natural_length))
    questions = [ex.question for ex in load_dataset("chat", n=total, seed=args.seed)]
    chat = [
        Request(f"chat{i}", f"{CHAT[i % len(CHAT)]} Then answer this: {q}", [], 64, not args.natural_length)
        for i, q in enumerate(questions)
    ]
    return {"rag": rag, "chat": chat}


def slices(args) -> dict:
    """(first request, count) of each load level and of the Poisson run: disjoint, in a fixed order, so a level
    sends the same requests to every server and no prompt repeats one sent before (a prompt cache would
    answer a repeat from memory)."""
    levels = sorted({int(x) for x in f"{args.levels},{args.peer_levels}".split(",")})
    out, first = {}, 0
    for c in levels:
        out[c] = (first, max(args.min_requests, args.per_client * c))
        first += out[c][1]
    out["poisson"] = (first, 2 * args.min_requests)
    return out


def server_for(config: str, port: int, args) -> Server:
    common = ["--threads", "2", "--dtype", args.dtype, "--max-queue", "256"]
    store = f"ram:4GiB,disk:{args.out / 'kv'}"  # the disk tier carries registered KV across the configs
    if config == "llama-server":
        from kvstash.model.registry import REGISTRY, find_packaged_gguf

        gguf = str(find_packaged_gguf(REGISTRY["smollm2-135m"]))
        return LlamaServer(config, port, gguf, max(int(x) for x in args.peer_levels.split(",")), 8192)
    method, _, batch = config.partition("/")
    reuse, _, spec = method.partition("+")  # blend+spec: speculative decoding on (--speculate ngram)
    flags = ["--reuse", reuse, "--max-batch", "1" if batch == "unbatched" else str(args.max_batch)]
    if args.max_batch_tokens:
        flags += ["--max-batch-tokens", str(args.max_batch_tokens)]
    flags += ["--speculate", "ngram"] if spec == "spec" else []
    return Kvstash(config, port, store, [*common, *flags])


def run_config(config: str, work: dict[str, list[Request]], args) -> dict:
    server = server_for(config, args.port, args)
    try:
        server.wait_ready()
        passages = sorted({p for reqs in work.values() for r in reqs for p in r.passages})
        register_s = server.register(passages)
        asyncio.run(closed_loop(server, [reqs[0] for reqs in work.values()], 1))  # warm-up: allocator, prefix head
        out = {"config": config, "register_s": round(register_s, 1), "levels": []}
        for name, reqs in work.items():
            levels = [int(x) for x in (args.peer_levels if config == "llama-server" else args.levels).split(",")]
            for c in levels:
                first, n = slices(args)[c]  # every level its own requests, the same ones for every server
                outcomes, wall = asyncio.run(closed_loop(server, reqs[first : first + n], c))
                row = {"workload": name, "clients": c, **summarize(outcomes, wall)}
                row["answers"] = {o.key: o.text for o in outcomes}
                out["levels"].append(row)
                print(f"{config} {name} x{c}: " + json.dumps({k: v for k, v in row.items() if k != "answers"}))
            if args.rate and name in args.rate and "/" not in config and config != "llama-server":
                first, n = slices(args)["poisson"]
                outcomes, wall = asyncio.run(poisson(server, reqs[first : first + n], args.rate[name], 7))
                row = {"workload": name, "clients": f"poisson {args.rate[name]}/s", **summarize(outcomes, wall)}
                row["answers"] = {o.key: o.text for o in outcomes}
                out["levels"].append(row)
                print(f"{config} {name} poisson: " + json.dumps({k: v for k, v in row.items() if k != "answers"}))
        out["peak_rss_mb"] = round(server.peak_rss_mb(), 1)
        return out
    finally:
        server.stop()


def identical_share(results: list[dict], config: str, reference: str) -> dict:
    """Per workload, the share of requests whose answer equals the reference config's answer."""

    def answers(name: str) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {}
        for r in results:
            if r["config"] == name:
                for row in r["levels"]:
                    found.setdefault(row["workload"], {}).update(row["answers"])
        return found

    a, b = answers(config), answers(reference)
    out = {}
    for w in a.keys() & b.keys():
        keys = a[w].keys() & b[w].keys()
        out[w] = {"same": sum(a[w][k] == b[w][k] for k in keys), "of": len(keys)}
    return out


def report(results: list[dict], args) -> str:
    lines = [f"Command: `{' '.join(sys.argv)}` (dtype {args.dtype}, 2 threads per server)", ""]
    cols = ["workload", "server", "clients", "req/s", "tok/s", "TTFT p50", "TTFT p90", "TTFT p99", "TPOT p50"]
    cols += ["TPOT p90", "errors"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for w in ("rag", "chat"):
        for r in results:
            for row in (x for x in r["levels"] if x["workload"] == w):
                lines.append(
                    f"| {w} | {r['config']} | {row['clients']} | {row['requests_per_s']:.3f} | {row['tokens_per_s']} | "
                    f"{f(row['ttft_p50'])} | {f(row['ttft_p90'])} | {f(row['ttft_p99'])} | {f(row['tpot_p50'])} | "
                    f"{f(row['tpot_p90'])} | {row['errors']}/{row['requests']} |"
                )
    lines += ["", "| server | peak RSS MiB | register s |", "|---|---|---|"]
    lines += [f"| {r['config']} | {r['peak_rss_mb']} | {r['register_s']} |" for r in results]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, w in enumerate(("rag", "chat")):
        for r in results:
            rows = [x for x in r["levels"] if x["workload"] == w and isinstance(x["clients"], int)]
            if not rows:
                continue
            c = [x["clients"] for x in rows]
            axes[0][col].plot(c, [x["tokens_per_s"] if w == "chat" else x["requests_per_s"] for x in rows], "o-",
                              label=r["config"])  # fmt: skip
            axes[1][col].plot(c, [x["ttft_p50"] or 0 for x in rows], "o-", label=r["config"])
        axes[0][col].set_title(f"{w}: {'completion tokens/s' if w == 'chat' else 'requests/s'}")
        axes[1][col].set_title(f"{w}: TTFT p50 (s)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("concurrent clients")
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="blend,full,blend/unbatched,full/unbatched,llama-server",
                    help="kvstash servers as REUSE[/unbatched], and llama-server (needs `make peers`)")  # fmt: skip
    ap.add_argument("--workloads", default="rag,chat")
    ap.add_argument("--levels", default="1,2,4,8,16", help="concurrent clients, comma-separated")
    ap.add_argument("--peer-levels", default="1,4,8", help="levels for llama-server (it prefills ~4x slower)")
    ap.add_argument("--per-client", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    ap.add_argument("--rag-examples", type=int, default=6, help="MuSiQue questions whose passages are registered")

    ap.add_argument(
        "--rate",
        type=json.loads,
        help="Poisson arrivals per second per workload, for the batched kvstash servers, e.g. '{\"rag\": 1}'",
    )
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, help="rows per step of the kvstash servers (default: the server's)")
    ap.add_argument(
        "--natural-length",
        action="store_true",
        help="let answers end at the model's end-of-sequence token (default: every answer runs to its max_tokens, "
        "sent as ignore_eos to both servers, so every config decodes the same tokens)",
    )
    ap.add_argument("--dtype", default="auto", help="auto: bf16 where the CPU has it natively, else fp32")
    ap.add_argument("--port", type=int, default=8790)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/serving"))
    args = ap.parse_args()
    args.dtype = resolve_dtype(args.dtype)  # the dtype every kvstash server computes in, named in the report
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    all_work = workloads(args)
    work = {w: all_work[w] for w in args.workloads.split(",")}
    configs = args.configs.split(",")
    if "llama-server" in configs and not LLAMA_SERVER.exists():
        raise SystemExit("llama-server is not built: run `make peers` (about 10 minutes), or drop it from --configs")
    results = [run_config(c, work, args) for c in configs]
    same = {c: identical_share(results, c, "blend/unbatched" if c.startswith("blend") else "full/unbatched")
            for c in configs if "/" not in c and c != "llama-server"}  # fmt: skip
    (args.out / "serving.json").write_text(json.dumps({"results": results, "identical": same}, indent=1))
    text = report(results, args) + "\n\nAnswers identical to the same reuse one at a time: " + json.dumps(same)
    (args.out / "serving.md").write_text(text + "\n")
    plot(results, args.out / "serving.png")
    print(text)


if __name__ == "__main__":
    main()
