"""The API's guards on a small app (no model): the API key, the body limit (with and without Content-Length),
CORS; and the request limits of the schemas."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import ValidationError

from kvstash.server.schemas import MAX_DOCUMENT_CHARS, MAX_MESSAGES, ChatRequest, DocumentRequest
from kvstash.server.security import add_security

KEY = "sk-kvstash-test"


def toy_app(api_key: str | None = KEY, origins: tuple[str, ...] = (), max_body: int = 1024) -> TestClient:
    app = FastAPI()

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": []}

    for path in ("/tokenize", "/detokenize"):
        app.add_api_route(path, models, methods=["POST"])
    app.add_api_route("/health", models)
    app.add_api_route("/metrics", models)
    app.add_api_route("/", models)
    add_security(app, api_key, origins, max_body)
    return TestClient(app)


def _is_key_error(r, message: str) -> None:
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_api_key") and message in err["message"]


@pytest.mark.parametrize(
    "method, path", [("GET", "/v1/models"), ("POST", "/v1/echo"), ("POST", "/tokenize"), ("POST", "/detokenize")]
)
def test_the_api_needs_the_key(method, path):
    client = toy_app()
    _is_key_error(client.request(method, path), "missing API key")
    _is_key_error(client.request(method, path, headers={"Authorization": "Bearer wrong"}), "invalid API key")
    _is_key_error(client.request(method, path, headers={"Authorization": KEY}), "invalid API key")  # no scheme
    assert client.request(method, path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.request(method, path, headers={"Authorization": f"bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/metrics", "/"])
def test_health_metrics_and_the_page_stay_open(path):
    assert toy_app().get(path).status_code == 200


def test_without_a_key_the_api_is_open():
    assert toy_app(api_key=None).get("/v1/models").status_code == 200


def test_a_body_over_the_limit_is_413_with_or_without_content_length():
    client = toy_app(api_key=None)
    assert client.post("/v1/echo", content=b"x" * 1024).json() == {"bytes": 1024}
    r = client.post("/v1/echo", content=b"x" * 1025)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "1024 bytes" in r.json()["error"]["message"]

    def chunks(n: int):
        for _ in range(n):
            yield b"x" * 300

    assert client.post("/v1/echo", content=chunks(3)).json() == {"bytes": 900}  # chunked, no Content-Length
    r = client.post("/v1/echo", content=chunks(4))
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_cors_only_for_the_allowed_origins():
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = toy_app(origins=("https://app.example",))
    r = allowed.options("/v1/echo", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    refused = allowed.get("/v1/models", headers={"Origin": "https://app.example"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example"
    other = allowed.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    closed = toy_app()  # the default: no CORS headers at all
    assert "access-control-allow-origin" not in closed.get("/health", headers={"Origin": "https://app.example"}).headers
    assert closed.options("/v1/echo", headers=preflight).status_code != 200


def test_request_limits_of_the_schemas():
    user = {"role": "user", "content": "Hi"}
    assert len(ChatRequest(messages=[user] * MAX_MESSAGES).messages) == MAX_MESSAGES
    with pytest.raises(ValidationError, match=f"at most {MAX_MESSAGES} items"):
        ChatRequest(messages=[user] * (MAX_MESSAGES + 1))
    DocumentRequest(text="x" * MAX_DOCUMENT_CHARS)
    with pytest.raises(ValidationError, match=f"at most {MAX_DOCUMENT_CHARS} characters"):
        DocumentRequest(text="x" * (MAX_DOCUMENT_CHARS + 1))


def test_serve_takes_the_key_from_the_flag_or_the_environment(monkeypatch):
    from kvstash.cli import build_parser

    monkeypatch.delenv("KVSTASH_API_KEY", raising=False)
    args = build_parser().parse_args(["serve"])
    assert (args.api_key, args.allowed_origins, args.max_body_bytes) == (None, "", "8MiB")
    monkeypatch.setenv("KVSTASH_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"
    assert build_parser().parse_args(["serve", "--api-key", "flag"]).api_key == "flag"


def test_server_config_checks_the_guards():
    from kvstash.server.state import ServerConfig

    config = ServerConfig(api_key="sk-secret", allowed_origins=(" https://a.example", "", "https://b.example "))
    assert config.allowed_origins == ("https://a.example", "https://b.example") and "sk-secret" not in repr(config)
    with pytest.raises(ValueError, match="max_body_bytes must be >= 1024"):
        ServerConfig(max_body_bytes=10)
    with pytest.raises(ValueError, match="api_key is empty"):
        ServerConfig(api_key=" ")
