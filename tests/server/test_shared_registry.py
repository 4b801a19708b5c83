"""Two servers sharing a Redis tier share documents and their KV."""

from __future__ import annotations

import secrets

import httpx
import pytest
import redis

from tests.redis_server import redis_url  # noqa: F401 - fixture
from tests.server.test_app import DOC, ServerProcess, ask, start_servers

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"test-serve-{secrets.token_hex(4)}:"


@pytest.fixture(scope="module")
def servers(redis_url, prefix):  # noqa: F811
    spec = f"ram:256MiB,{redis_url}?prefix={prefix}"
    a, b = ServerProcess("--store", spec), ServerProcess("--store", spec)
    try:
        start_servers(a, b)
        yield a, b
    finally:
        for s in (a, b):
            assert s.stop() == 0, s.log()
            s.log_path.unlink(missing_ok=True)


def test_document_registered_on_one_server_is_reused_by_the_other(servers, redis_url, prefix):  # noqa: F811
    a, b = servers
    doc = httpx.post(a.url + "/v1/documents", json={"text": DOC}, timeout=180).json()
    assert httpx.get(f"{b.url}/v1/documents/{doc['id']}").json()["chunks"] == doc["chunks"]

    r = ask(
        b.client(), "What is the secret code of the blue project?", max_tokens=20, extra_body={"documents": [doc["id"]]}
    )
    assert "4417" in r.choices[0].message.content
    assert r.usage.prompt_tokens_details.cached_tokens >= doc["tokens"]  # the document's KV came from Redis
    assert r.model_extra["kvstash"]["tier_hits"].get("redis", 0) >= 1

    # the registry lives beside the tier's prefix, so the tier's own scans (keys, verify, clear) never see it
    client = redis.Redis.from_url(redis_url)
    assert client.exists(f"kvstash-docs:{prefix}{doc['id']}")
    assert all(b":" not in k[len(prefix) :] for k in client.scan_iter(match=f"{prefix}*"))

    assert httpx.delete(f"{b.url}/v1/documents/{doc['id']}").status_code == 200
    assert httpx.get(f"{a.url}/v1/documents/{doc['id']}").status_code == 404
