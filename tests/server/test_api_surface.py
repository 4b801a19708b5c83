"""The OpenAI surface beyond chat, on a server started with ``--api-key``, through the official client:
``/v1/completions`` (text or token ids, documents, streamed or not), chat ``logprobs`` / ``top_logprobs``,
``usage`` everywhere, ``/tokenize`` and ``/detokenize``, the key and the body limit, and ``/metrics`` as
Prometheus reads it."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.test_app import DOC, MODEL, REQUEST_TIMEOUT_S, running_server

KEY = "sk-kvstash-surface"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server():
    with running_server("--api-key", KEY, "--max-body-bytes", "256KiB", "--allowed-origins", "http://app.test") as s:
        yield s


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, timeout=REQUEST_TIMEOUT_S, max_retries=0)


def post(server, path: str, **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=REQUEST_TIMEOUT_S, headers=AUTH, **kw)


def tokenize(server, text: str) -> list[int]:
    r = post(server, "/tokenize", json={"model": MODEL, "prompt": text})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


# --- the key, the body limit ----------------------------------------------------------------------------


def test_the_key_is_required_and_checked(server):
    with pytest.raises(openai.AuthenticationError) as e:
        client(server, "wrong").models.list()
    assert e.value.code == "invalid_api_key"
    assert [m.id for m in client(server).models.list()] == [MODEL]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/documents", "/tokenize", "/detokenize"):
        r = httpx.post(server.url + path, json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    for path in ("/health", "/metrics", "/", "/static/app.js"):
        assert httpx.get(server.url + path).status_code == 200, path
    origin = {"Origin": "http://app.test"}
    assert httpx.get(server.url + "/health", headers=origin).headers["access-control-allow-origin"] == "http://app.test"


def test_bodies_over_the_limit_get_413(server):
    text = "word " * 60_000  # 300 KB
    r = post(server, "/v1/documents", json={"text": text})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    body = ('{"text": "' + text + '"}').encode()
    chunked = post(server, "/v1/documents", content=(body[i : i + 65536] for i in range(0, len(body), 65536)))
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/health").status_code == 200


def test_chat_limits_are_400s(server):
    user = {"role": "user", "content": "Hi"}
    r = post(server, "/v1/chat/completions", json={"messages": [user] * 513})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    long = {"role": "user", "content": "word " * 40_000}  # 200 KB, under the body limit, over any context
    r = post(server, "/v1/chat/completions", json={"messages": [user, long]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "messages.1", r.text
    r = post(server, "/v1/chat/completions", json={"messages": [user], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = post(server, "/v1/chat/completions", json={"messages": [user], "logprobs": True, "top_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


# --- /tokenize, /detokenize -----------------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip(server):
    r = post(server, "/tokenize", json={"model": MODEL, "prompt": PROMPT})
    body = r.json()
    assert r.status_code == 200 and body["count"] == len(body["tokens"]) > 3 and body["max_model_len"] == 8192
    back = post(server, "/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}
    for bad in ([-1], [10**9]):
        r = post(server, "/detokenize", json={"tokens": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", r.text
    assert post(server, "/tokenize", json={"model": "gpt-4o", "prompt": "x"}).status_code == 404


# --- /v1/completions ------------------------------------------------------------------------------------


def test_completions_whole_streamed_and_from_token_ids(server):
    c = client(server)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    text = r.choices[0].text
    assert text.strip() and r.choices[0].finish_reason in ("stop", "length")
    ids = tokenize(server, PROMPT)
    assert r.usage.prompt_tokens == len(ids) and 0 < r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    from_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert from_ids.choices[0].text == text and from_ids.usage == r.usage
    chunks = list(
        c.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt=[1, 10**9], max_tokens=2)
    assert e.value.param == "prompt"


def test_completions_with_documents_reuse_their_kv(server):
    doc = post(server, "/v1/documents", json={"text": DOC}).json()
    prompt = "Question: What is the secret code of the blue project?\nAnswer: The secret code is"
    c = client(server)
    runs = [
        c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body={"documents": [doc["id"]]}
        )
        for _ in range(2)
    ]
    assert runs[0].usage.prompt_tokens == doc["tokens"] + len(tokenize(server, prompt))
    assert runs[1].usage.prompt_tokens_details.cached_tokens >= doc["tokens"]
    assert "4417" in runs[1].choices[0].text


def test_completion_logprobs_in_the_legacy_shape(server):
    r = client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and math.isclose(max(top.values()), logprob, abs_tol=1e-5) and top[token] == logprob


# --- chat logprobs --------------------------------------------------------------------------------------


def _chat(server, **kw):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    return client(server).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12, **kw)


def test_chat_logprobs_whole_and_streamed(server):
    plain = _chat(server)
    assert plain.choices[0].logprobs is None
    r = _chat(server, logprobs=True, top_logprobs=3)
    answer, content = r.choices[0].message.content, r.choices[0].logprobs.content
    assert answer == plain.choices[0].message.content  # asking for logprobs changes nothing else
    assert "".join(t.token for t in content) == answer and len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the likeliest token
        assert t.logprob == max(a.logprob for a in t.top_logprobs) <= 0
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode() == t.token
    chunks = list(_chat(server, logprobs=True, top_logprobs=3, stream=True, stream_options={"include_usage": True}))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.top_logprobs[1].token) for t in streamed] == [
        (t.token, t.top_logprobs[1].token) for t in content
    ]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-5) for a, b in zip(streamed, content, strict=True))
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    bare = _chat(server, logprobs=True)
    assert all(t.top_logprobs == [] for t in bare.choices[0].logprobs.content)


# --- /metrics -------------------------------------------------------------------------------------------


def test_metrics_parse_as_prometheus_text(server):
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "kvstash_requests",
        "kvstash_ttft_seconds",
        "kvstash_tokens",
        "kvstash_cache_hits",
        "process_cpu_seconds",
    ):
        assert name in families, name
    gauges = {name: families[name].samples[0].value for name in ("kvstash_cache_hit_rate", "kvstash_reused_share")}
    assert all(0 <= v <= 1 for v in gauges.values()) and gauges["kvstash_reused_share"] > 0
    routes = {(s.labels["route"], s.labels["status"]) for s in families["kvstash_requests"].samples}
    assert ("/v1/completions", "200") in routes and ("/tokenize", "200") in routes
    assert ("unmatched", "401") in routes  # refused before routing, still counted
    assert "process_resident_memory_bytes" in text
