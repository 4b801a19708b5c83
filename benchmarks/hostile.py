"""Malformed and hostile HTTP requests for the reliability benchmark (``benchmarks/reliability.py``).

:func:`hostile_requests` draws requests from a fixed seed: wrong JSON types, NaN and infinities, huge and
deeply nested JSON, bad paths and document ids, wrong methods and content types, invalid UTF-8 and random
bytes. A request that happens to be valid asks for one token, so the model costs little. :func:`send_all`
sends them and counts the answers by status; a status >= 500 is a server bug.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field

import httpx

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/documents", "/tokenize", "/detokenize")
FIELDS = {
    "/v1/chat/completions": ("messages", "model", "stream", "stream_options", "temperature", "top_p", "max_tokens",
                             "max_completion_tokens", "stop", "seed", "n", "logprobs", "top_logprobs", "documents",
                             "reuse", "token_view"),
    "/v1/completions": ("prompt", "model", "max_tokens", "temperature", "top_p", "stop", "seed", "logprobs", "echo",
                        "stream", "n", "suffix"),
    "/v1/documents": ("text",),
    "/tokenize": ("prompt", "messages", "model", "add_special_tokens"),
    "/detokenize": ("tokens", "model"),
}  # fmt: skip
JUNK = (None, True, False, 0, -1, 1, 2**63, -(2**63), 1e308, -1e308, 0.5, "", "x", "NaN", "doc-nope", [], {},
        [None], [1, "a"], {"a": 1}, [{"role": "user"}], [{"type": "image", "url": "x"}], float("nan"),
        float("inf"), float("-inf"), "\u0000", "\ud800", "🙂" * 50, "<script>", "../../etc/passwd")  # fmt: skip
METHODS = ("GET", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "POST", "TRACE")
CONTENT_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/xml", "application/json; charset=latin-1", "", "application/octet-stream")  # fmt: skip


@dataclass(frozen=True)
class HostileRequest:
    kind: str  # which generator made it
    method: str
    path: str
    content: bytes = b""
    headers: dict = field(default_factory=dict)


def _valid_body(route: str) -> dict:
    """A valid body for ``route`` that costs the model one token at most."""
    return {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        "/v1/completions": {"prompt": "Hello", "max_tokens": 1},
        "/v1/documents": {"text": "A short note."},
        "/tokenize": {"prompt": "Hello"},
        "/detokenize": {"tokens": [1, 2, 3]},
    }[route]


def _json(body: object) -> bytes:
    return json.dumps(body, allow_nan=True, ensure_ascii=False).encode("utf-8", errors="surrogatepass")


def _post(kind: str, route: str, content: bytes, ctype: str = "application/json") -> HostileRequest:
    return HostileRequest(kind, "POST", route, content, {"content-type": ctype} if ctype else {})


def wrong_types(rng: random.Random) -> HostileRequest:
    route = rng.choice(ROUTES)
    body = _valid_body(route)
    for name in rng.sample(FIELDS[route], k=min(len(FIELDS[route]), rng.randint(1, 3))):
        body[name] = rng.choice(JUNK)
    if rng.random() < 0.2:
        body = rng.choice(JUNK)  # not an object at all
    return _post("wrong types", route, _json(body))


def huge(rng: random.Random) -> HostileRequest:
    route = rng.choice(("/v1/chat/completions", "/v1/completions", "/tokenize"))
    size = rng.choice((10**5, 10**6, 9 * 2**20))  # the last is over the default 8 MiB body limit
    text = "".join(rng.choice("abc ") for _ in range(1000)) * (size // 1000)
    body = {"/v1/chat/completions": {"messages": [{"role": "user", "content": text}], "max_tokens": 1},
            "/v1/completions": {"prompt": text, "max_tokens": 1}, "/tokenize": {"prompt": text}}[route]  # fmt: skip
    if rng.random() < 0.3:
        body = {"messages": [{"role": "user", "content": "Hi"}] * rng.choice((10**4, 10**5)), "max_tokens": 1}
        route = "/v1/chat/completions"
    return _post("huge JSON", route, _json(body))


def nested(rng: random.Random) -> HostileRequest:
    depth = rng.choice((100, 1000, 10**4, 10**5))
    open_, close = rng.choice((("[", "]"), ('{"a":', "}"), ('{"messages":[', "]}")))
    inner = open_ * depth + "1" + close * depth
    if rng.random() < 0.5:
        inner = '{"messages": [{"role": "user", "content": ' + inner + '}], "max_tokens": 1}'
    return _post("deeply nested JSON", rng.choice(ROUTES), inner.encode())


def bad_path(rng: random.Random) -> HostileRequest:
    junk = rng.choice(("doc-", "doc-" + "g" * 24, "doc-" + "0" * 25, "..%2F..%2Fetc%2Fpasswd", "%00", "%ff%fe",
                       "a" * 5000, "%F0%9F%99%82", "doc-%20", ".", "..", "~", "*", "%2e%2e"))  # fmt: skip
    method = rng.choice(("GET", "DELETE", "POST"))
    path = rng.choice(("/v1/documents/", "/v1/models/", "/v1/", "/", "/static/", "/v1/chat/completions/"))
    return HostileRequest("bad path or id", method, path + junk)


def wrong_method(rng: random.Random) -> HostileRequest:
    path = rng.choice((*ROUTES, "/health", "/metrics", "/v1/models", "/", "/v1/documents/doc-" + "0" * 24))
    return HostileRequest("wrong method", rng.choice(METHODS), path, _json(_valid_body(ROUTES[0])))


def wrong_content_type(rng: random.Random) -> HostileRequest:
    route = rng.choice(ROUTES)
    return _post("wrong content type", route, _json(_valid_body(route)), rng.choice(CONTENT_TYPES))


def random_bytes(rng: random.Random) -> HostileRequest:
    content = rng.randbytes(rng.choice((1, 16, 1000, 100_000)))
    if rng.random() < 0.5:  # JSON that is not UTF-8
        content = b'{"messages": [{"role": "user", "content": "' + content[:200] + b'"}]}'
    return _post("random bytes", rng.choice(ROUTES), content, rng.choice(("application/json", "")))


GENERATORS = (wrong_types, huge, nested, bad_path, wrong_method, wrong_content_type, random_bytes)
WEIGHTS = (30, 5, 10, 15, 15, 10, 15)


def hostile_requests(n: int, seed: int = 0) -> list[HostileRequest]:
    """``n`` hostile requests, the same for the same seed."""
    rng = random.Random(seed)
    return [rng.choices(GENERATORS, WEIGHTS)[0](rng) for _ in range(n)]


@dataclass
class HostileResult:
    requests: int
    statuses: Counter = field(default_factory=Counter)  # status -> count
    server_errors: list[str] = field(default_factory=list)  # "kind METHOD path -> status: body" of each >= 500

    @property
    def errors_5xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)


def send_all(url: str, requests: list[HostileRequest], timeout: float = 120) -> HostileResult:
    """Send every request in order over one connection pool; count the statuses."""
    out = HostileResult(len(requests))
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for r in requests:
            try:
                resp = client.request(r.method, r.path, content=r.content or None, headers=r.headers)
            except (httpx.InvalidURL, httpx.LocalProtocolError):  # httpx itself refused to send it
                out.statuses[0] += 1
                continue
            out.statuses[resp.status_code] += 1
            if resp.status_code >= 500:
                out.server_errors.append(f"{r.kind} {r.method} {r.path[:80]} -> {resp.status_code}: {resp.text[:200]}")
    return out
