"""Documents survive a Redis outage: a server answers from its own copy while Redis is down, and writes the
registry entry (and, on recompute, the chunk KV) back when Redis comes back empty."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from kvstash.server.documents import Document, RegistryUnavailable, document_id, open_registry
from tests.redis_cluster import redis_cluster  # noqa: F401 - fixture
from tests.redis_server import RedisServer, skip_without_redis, start_server
from tests.server.test_app import DOC, ask, running_server

pytestmark = pytest.mark.redis

QUESTION = "What is the secret code of the blue project?"
UNKNOWN = "doc-" + "0" * 24


@pytest.fixture
def redis_server():
    skip_without_redis()
    server = start_server()
    yield server
    server.cleanup()


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " "))


def _chat(server, doc_id: str, **kw) -> str:
    r = ask(server.client(max_retries=0), QUESTION, max_tokens=16, extra_body={"documents": [doc_id]}, **kw)
    return r.choices[0].message.content


def _wait_until_redis_is_tried_again() -> None:
    time.sleep(1.2)  # the tier and the registry skip Redis for 1 s after a failure


def test_a_chat_naming_a_document_is_answered_through_an_outage_and_a_restart(redis_server: RedisServer):
    # ram:1KiB holds no record, so every chunk's KV comes from Redis or is recomputed; fp32 records are exact
    with running_server("--store", f"ram:1KiB,{redis_server.url}", "--codec", "fp32") as s:
        doc = httpx.post(s.url + "/v1/documents", json={"text": DOC}, timeout=180).json()
        before = _chat(s, doc["id"])
        assert "4417" in before

        redis_server.stop()
        assert _chat(s, doc["id"]) == before  # the KV recomputed, the document from this server's copy
        assert httpx.get(f"{s.url}/v1/documents/{doc['id']}").json()["tokens"] == doc["tokens"]
        assert _metric(s.url, "kvstash_registry_fallbacks_total") == 2
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                       "documents": [UNKNOWN]}, timeout=60)  # fmt: skip
        assert r.status_code == 404 and r.json()["error"]["code"] == "document_not_found"
        assert httpx.delete(f"{s.url}/v1/documents/{doc['id']}").status_code == 503  # deleting needs Redis

        redis_server.start()  # empty
        _wait_until_redis_is_tried_again()
        assert _chat(s, doc["id"]) == before
        client = redis.Redis.from_url(redis_server.url)
        assert client.exists(f"kvstash-docs:kvstash:{doc['id']}")  # the entry, written back on use
        assert any(client.scan_iter(match="kvstash:*"))  # the recomputed chunk KV, stored by the normal path
        assert _metric(s.url, "kvstash_registry_writebacks_total") == 1
        assert httpx.get(f"{s.url}/v1/documents/{UNKNOWN}").status_code == 404
        assert "Traceback" not in s.log() and "wrote it back" in s.log()


def test_a_deleted_document_is_not_written_back(redis_server: RedisServer, tmp_path):
    """Server A keeps a copy (in the disk tier's directory); server B deletes the document from Redis: A
    reads the tombstone and forgets its copy instead of bringing the document back."""
    spec = f"ram,disk:{tmp_path}/kv,{redis_server.url}"
    a, b = open_registry(spec), open_registry(f"ram,{redis_server.url}")
    assert a.kind == "redis+disk" and b.kind == "redis+memory"
    doc = Document(document_id("text"), ("text",), 3, 1)
    a.put(doc)
    assert (tmp_path / "kv" / "documents" / f"{doc.id}.json").is_file()
    assert b.get(doc.id) == doc and b.delete(doc.id)
    assert a.get(doc.id) is None and not (tmp_path / "kv" / "documents" / f"{doc.id}.json").exists()
    a.put(doc)  # registering again clears the tombstone
    assert b.get(doc.id) == doc

    redis_server.stop()
    with pytest.raises(RegistryUnavailable):
        b.delete(doc.id)
    assert a.get(doc.id) == doc and b.get(doc.id) == doc
    assert (a.counts.fallbacks, b.counts.fallbacks) == (1, 1)
    redis_server.start()
    _wait_until_redis_is_tried_again()
    assert b.get(doc.id) == doc and a.counts.writebacks + b.counts.writebacks == 1
    for reg in (a, b):
        reg.close()


def test_a_document_another_server_registered_survives_an_outage_once_mirrored(redis_server: RedisServer):
    """Server A registers a document B never served; B's mirror copies it, so with Redis down B still has it."""
    a, b = open_registry(f"ram,{redis_server.url}"), open_registry(f"ram,{redis_server.url}")
    docs = [Document(document_id(t), (t,), 3, 1) for t in ("first text", "second text")]
    a.put(docs[0])
    assert b.mirror() == 1 and b.mirror() == 0  # copied once; what B holds is not fetched again
    a.put(docs[1])
    b.start_mirror(0.05)
    deadline = time.monotonic() + 5
    while b.counts.mirrored < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert b.counts.mirrored == 2

    redis_server.stop()
    assert [b.get(d.id) for d in docs] == docs  # from B's own copy
    assert b.counts.fallbacks == 2 and b.get(UNKNOWN) is None
    with pytest.raises(RegistryUnavailable):
        b.mirror()  # nothing copied while Redis is down; the loop keeps running
    t = time.monotonic()
    b.close()  # stops the mirror thread
    assert time.monotonic() - t < 2 and not b._mirror.is_alive()
    a.close()


def test_the_registry_lists_every_document_across_a_cluster(redis_cluster):  # noqa: F811
    reg = open_registry(redis_cluster.url)
    docs = [Document(document_id(f"text {i}"), (f"text {i}",), 3, 1) for i in range(12)]
    for d in docs:
        reg.put(d)
    assert len({redis_cluster.node_of(f"kvstash-docs:kvstash:{d.id}").port for d in docs}) > 1  # spread out
    assert sorted(reg.shared.ids()) == sorted(d.id for d in docs)
    reg.close()
