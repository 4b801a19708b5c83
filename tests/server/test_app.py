"""The server with the official OpenAI client: chat, streaming, documents, errors, metrics, shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from kvstash.model.dtype import resolve_dtype
from tests.redis_server import free_port

MODEL = "smollm2-135m"


START_TIMEOUT_S = 240  # model load; generous for a busy 2-core machine


REQUEST_TIMEOUT_S = 180


DOC = "The secret code of the blue project is 4417. The blue project is run by Ada Lindqvist."


class ServerProcess:
    """One ``kvstash serve`` subprocess; ``start`` waits until /health answers."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.args = args
        self.log_path = Path(tempfile.mkstemp(prefix="kvstash-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        cmd = [sys.executable, "-m", "kvstash.cli", "serve", "--port", str(self.port), *self.args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvstash serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"kvstash serve did not answer /health in {START_TIMEOUT_S} s:\n{self.log()}")

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc is not None else None


def start_servers(*servers: ServerProcess) -> None:
    """Launch all, then wait for all (model loads overlap)."""
    for s in servers:
        s.launch()
    for s in servers:
        s.wait_ready()


@contextmanager
def running_server(*args: str):
    """A served kvstash (fp32, 3 s to shut down, plus ``args``), stopped and its log removed afterwards."""
    s = ServerProcess("--shutdown-timeout", "3", "--dtype", "float32", *args)
    start_servers(s)
    try:
        yield s
    finally:
        s.stop()
        s.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def server():
    # fp32, the exact reference: batched answers equal one-at-a-time ones bit for bit (in bf16, the default, a
    # batch's matmuls round differently; benchmarks/serving.py reports the share of identical answers there)
    with running_server() as s:
        yield s


def post(server: ServerProcess, path: str, **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=REQUEST_TIMEOUT_S, **kw)


def ask(client: openai.OpenAI, question: str, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, **kw
    )


USER = [{"role": "user", "content": "Hi"}]


BAD_REQUESTS = {
    "malformed JSON": (b'{"messages": [', 400, "json_invalid"),
    "messages not a list": ({"messages": "Hi"}, 400, "list_type"),
    "max_tokens not an int": ({"messages": USER, "max_tokens": "many"}, 400, "int_type"),
    "bad role": ({"messages": [{"role": "robot", "content": "Hi"}]}, 400, "literal_error"),
    "unknown model": ({"messages": USER, "model": "gpt-4o"}, 404, "model_not_found"),
    "unknown document": ({"messages": USER, "documents": ["doc-" + "0" * 24]}, 404, "document_not_found"),
    "ignore_eos not a bool": ({"messages": USER, "ignore_eos": "yes"}, 400, "bool_type"),
    "max_tokens 0": ({"messages": USER, "max_tokens": 0}, 400, "invalid_value"),
    "max_tokens too large": ({"messages": USER, "max_tokens": 10**9}, 400, "invalid_value"),
    "context overflow": (
        {"messages": [{"role": "user", "content": "word " * 9000}], "max_tokens": 4},
        400,
        "context_length_exceeded",
    ),
}


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in server.client().models.list()] == [MODEL]


def test_chat_non_streamed(server):
    r = ask(server.client(), "What is the capital of France?", max_tokens=16)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"  # the model's own end of turn, before max_tokens
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    cut = ask(server.client(), "What is the capital of France?", max_tokens=3)
    assert cut.choices[0].message.content == "The capital of"
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    # vLLM's ignore_eos (through the official client's extra_body): the same answer, then on to max_tokens
    on = ask(server.client(), "What is the capital of France?", max_tokens=12, extra_body={"ignore_eos": True})
    assert on.choices[0].message.content.startswith("The capital of France is Paris.")
    assert on.choices[0].finish_reason == "length" and on.usage.completion_tokens == 12


def test_chat_streamed(server):
    stream = ask(
        server.client(),
        "What is the capital of France?",
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_documents_are_reused_across_requests(server):
    r = post(server, "/v1/documents", json={"text": DOC})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"].startswith("doc-") and doc["chunks"] == 1 and doc["tokens"] > 10
    assert httpx.get(f"{server.url}/v1/documents/{doc['id']}").json()["tokens"] == doc["tokens"]
    client = server.client()
    answers = [
        ask(
            client, "What is the secret code of the blue project?", max_tokens=20, extra_body={"documents": [doc["id"]]}
        )
        for _ in range(2)
    ]
    assert all("4417" in a.choices[0].message.content for a in answers)
    assert answers[1].usage.prompt_tokens_details.cached_tokens >= doc["tokens"]
    assert httpx.delete(f"{server.url}/v1/documents/{doc['id']}").json()["deleted"] is True
    assert httpx.get(f"{server.url}/v1/documents/{doc['id']}").status_code == 404


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_openai_error(server, case):
    body, status, code = BAD_REQUESTS[case]
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = post(server, "/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_official_client_raises_on_errors(server):
    with pytest.raises(openai.NotFoundError, match="not served") as e:
        server.client(max_retries=0).chat.completions.create(model="gpt-4o", messages=USER)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens") as e:
        ask(server.client(max_retries=0), "Hi", max_tokens=0)
    assert e.value.param == "max_tokens"
    assert post(server, "/v1/documents", json={"text": "   "}).status_code == 400
    assert post(server, "/v1/documents", json={"txt": "x"}).status_code == 400
    assert httpx.get(f"{server.url}/v1/documents/doc-nope").status_code == 404


def test_concurrent_clients_are_batched_and_get_the_answers_they_get_alone(server):
    """Six clients at once: the scheduler decodes them together, and every greedy answer equals the one the same
    request gets alone."""
    questions = [f"What is the capital of {c}? Answer in one sentence." for c in ("France", "Italy", "Japan", "Peru")]
    questions += ["List the numbers from 1 to 30, separated by commas.", "Write a short story about a river."]
    client = server.client()

    def run(question: str) -> str:
        return ask(client, question, max_tokens=24).choices[0].message.content

    alone = [run(q) for q in questions]
    before = _batched_steps(server)
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(run, questions))
    assert together == alone
    assert "paris" in together[0].lower() and "rome" in together[1].lower()
    assert _batched_steps(server) > before  # steps that decoded two or more requests at once


def _batched_steps(server) -> int:
    """Steps that decoded more than one sequence, from the batch-size histogram in /metrics."""
    text = httpx.get(server.url + "/metrics").text
    count = next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("kvstash_batch_size_count"))
    ones = next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith('kvstash_batch_size_bucket{le="1"}'))
    return int(count - ones)


def test_a_request_larger_than_the_kv_budget_is_refused_with_400():
    s = ServerProcess("--kv-budget", "20MiB")
    start_servers(s)
    try:
        # the serving default: bf16 where this CPU has it natively, else fp32
        assert httpx.get(s.url + "/health").json()["dtype"] == resolve_dtype("auto")
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4000}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        assert r.status_code == 400 and "KV budget" in r.json()["error"]["message"]
        small = httpx.post(s.url + "/v1/chat/completions", json={**body, "max_tokens": 8}, timeout=REQUEST_TIMEOUT_S)
        assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] > 0
    finally:
        s.stop()


def test_disconnect_mid_stream_frees_the_model(server):
    body = {
        "messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}],
        "max_tokens": 400,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S) as r:
        lines = r.iter_lines()
        assert next(ln for ln in lines if ln.startswith("data:"))  # the first chunk arrived; hang up
    t0 = time.monotonic()
    r = ask(server.client(), "What is the capital of France?", max_tokens=8)
    assert "paris" in r.choices[0].message.content.lower()
    metrics = httpx.get(server.url + "/metrics").text
    assert 'kvstash_generations_total{reason="cancelled"} 1' in metrics
    assert time.monotonic() - t0 < REQUEST_TIMEOUT_S


def test_metrics_and_request_logs(server):
    text = httpx.get(server.url + "/metrics").text
    assert httpx.get(server.url + "/metrics").headers["content-type"].startswith("text/plain")
    for name in (
        "kvstash_requests_total",
        "kvstash_ttft_seconds_bucket",
        "kvstash_tokens_total",
        "kvstash_cache_hits_total",
        "kvstash_batch_size_bucket",
        "kvstash_time_per_output_token_seconds_bucket",
        "kvstash_queue_seconds_bucket",
        "kvstash_preemptions_total",
        "kvstash_running",
        "kvstash_queue_depth",
    ):
        assert f"# TYPE {name.removesuffix('_bucket')}" in text and name in text
    assert 'kvstash_requests_total{method="POST",route="/v1/chat/completions",status="404"}' in text
    assert "kvstash_recomputed_share" in text and 'kvstash_cache_misses_total{tier="ram"}' in text
    lines = [json.loads(ln.split("kvstash: ", 1)[1]) for ln in server.log().splitlines() if '"event": "request"' in ln]
    chats = [ln for ln in lines if ln["path"] == "/v1/chat/completions" and ln["status"] == 200]
    assert chats and all("ttft_s" in ln or ln.get("cancelled") for ln in chats)


def test_sigterm_mid_stream_exits_cleanly(server):
    """The last test using the module's server: it stops it while a generation streams."""
    body = {"messages": [{"role": "user", "content": "Count from 1 to 1000."}], "max_tokens": 400, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S) as r:
        lines = r.iter_lines()
        assert next(ln for ln in lines if '"content"' in ln)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rest = [ln for ln in lines if ln.startswith("data:")]
    assert server.proc.wait(30) == 0
    assert time.monotonic() - t0 < 30
    assert rest[-1] == "data: [DONE]" or json.loads(rest[-1][5:])["error"]["code"] == "unavailable"
    log = server.log()
    assert '"event": "stopped"' in log and "Traceback" not in log, log


def test_messages_become_segments():
    from kvstash.server.chat import build_segments
    from kvstash.server.documents import Document
    from kvstash.server.schemas import ApiError, Message

    msgs = [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Hi"),
        Message(role="assistant", content="Hello!"),
        Message(role="developer", content="Use the documents."),
        Message(role="user", content=[{"type": "text", "text": "Code?"}]),
    ]
    doc = Document("doc-" + "1" * 24, ("chunk one", "chunk two"), 9, 0)
    segs = build_segments(msgs, [doc])
    assert [(s.kind, s.text) for s in segs] == [
        ("system", "Be brief.\n\nUse the documents."),
        ("document", "chunk one"),
        ("document", "chunk two"),
        ("user", "User: Hi\nAssistant: Hello!\n\nCode?"),
    ]
    with pytest.raises(ApiError, match="last non-system message"):
        build_segments([Message(role="user", content="Hi"), Message(role="assistant", content="Yo")], [])


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_document_registry_round_trip(tmp_path, kind):
    from kvstash.server.documents import Document, document_id, open_registry

    registry = open_registry("ram" if kind == "memory" else f"ram,disk:{tmp_path}")
    assert registry.kind == kind
    doc = Document(document_id("text"), ("text",), 3, 1)
    assert registry.get(doc.id) is None
    registry.put(doc)
    assert registry.get(doc.id) == doc
    assert registry.delete(doc.id) and not registry.delete(doc.id)
    if kind == "disk":
        assert (tmp_path / "documents").is_dir()
