"""The browser playground and the API fields it uses: the page and its files, the ``reuse`` and ``token_view``
extension fields (exact outcomes per method), the ``kvstash`` field of a streamed answer, and the page itself
driven in headless Chromium (documents, a streamed answer, a comparison, highlighted tokens, bad input, a server
that went away).

The browser test needs Debian's ``chromium`` and the ``playwright`` package (``make setup`` installs both); it
skips, saying how to install them, when either is missing. It saves a screenshot of the comparison view; with
``KVSTASH_SCREENSHOT=docs/playground.png`` (``make screenshot``) it writes the README's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

import kvstash
from tests.server.test_app import REQUEST_TIMEOUT_S, ServerProcess, post, running_server

DEMO_DOCS = Path(kvstash.__file__).parent / "demo_docs"
CURIE = (DEMO_DOCS / "curie.txt").read_text()
EIFFEL = (DEMO_DOCS / "eiffel.txt").read_text()
QUESTION = "Which two elements did Marie Curie discover?"


@pytest.fixture(scope="module")
def server():
    with running_server() as s:  # fp32: the exact reference, so answers are the same on every run
        yield s


@pytest.fixture(scope="module")
def doc_ids(server) -> list[str]:
    ids = []
    for text in (CURIE, EIFFEL):
        r = post(server, "/v1/documents", json={"text": text})
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    return ids


def chat(server: ServerProcess, doc_ids: list[str], **fields) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": QUESTION}], "documents": doc_ids, "max_tokens": 4} | fields
    return post(server, "/v1/chat/completions", json=body)


# --- the page and the API fields -------------------------------------------------------------------------


def test_serve_prints_the_playground_url_and_serves_the_page(server):
    assert f"kvstash: playground at http://127.0.0.1:{server.port}/" in server.log()
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>kvstash playground</title>" in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.text) > 1000
    missing = httpx.get(server.url + "/static/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fancy", "unknown reuse method"),
        ("", "unknown reuse method"),
        ("blend:lots", "blend ratio must be a number"),
        ("blend:1.5", "blend ratio must be in [0, 1]"),
        ("naive:0.3", "only blend and cacheblend take a ratio"),
    ],
)
def test_a_bad_reuse_field_is_a_400_naming_the_choices(server, spec, message):
    r = post(server, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "reuse": spec})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "reuse" and err["code"] == "invalid_value" and message in err["message"]


def test_reuse_and_token_view_must_have_their_types(server):
    for field, value in (("reuse", 0.15), ("token_view", "yes")):
        r = post(server, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("spec", ["full", "naive", "blend:1.0", "blend:0.15", "cacheblend:0.15", "prefix"])
def test_token_view_marks_the_recomputed_tokens(server, doc_ids, spec):
    # prefix caches the documents in context, which blend would then load exactly: give it the other order
    ids, texts = (doc_ids[::-1], [EIFFEL, CURIE]) if spec == "prefix" else (doc_ids, [CURIE, EIFFEL])
    r = chat(server, ids, reuse=spec, token_view=True)
    assert r.status_code == 200, r.text
    ext = r.json()["kvstash"]
    view = ext["token_view"]
    assert ext["reuse"] == spec.partition(":")[0]
    assert [s["kind"] for s in view] == ["glue", "system", "glue", "document", "document", "user", "glue"]
    assert sum(len(s["tokens"]) for s in view) == ext["prompt_tokens"]
    assert sum(len(s["recomputed"]) for s in view) == ext["recomputed_tokens"]
    head, docs, rest = view[:3], view[3:5], view[5:]
    assert [(d["document"], d["chunk"]) for d in docs] == [(ids[0], 0), (ids[1], 0)]
    assert ["".join(d["tokens"]) for d in docs] == [t.strip() + "\n\n" for t in texts]
    every = [list(range(len(s["tokens"]))) for s in view]
    # the template and system prompt: computed, or loaded exactly from the prefix cache; the question: computed
    assert all(s["recomputed"] in ([], every[i]) for i, s in enumerate(head))
    assert [s["recomputed"] for s in rest] == every[5:]
    doc_tokens = sum(len(d["tokens"]) for d in docs)
    recomputed = [d["recomputed"] for d in docs]
    if spec == "full":
        assert [s["recomputed"] for s in view] == every
    elif spec in ("prefix", "blend:1.0"):
        assert recomputed == every[3:5]
    elif spec == "naive":
        assert recomputed == [[], []] and all(d["reused"] == len(d["tokens"]) and d["tier"] == "ram" for d in docs)
    else:
        assert sum(map(len, recomputed)) == round(0.15 * doc_tokens)
        assert all(0 < len(d["recomputed"]) < len(d["tokens"]) and d["tier"] == "ram" for d in docs)
        for offsets, d in zip(recomputed, docs, strict=True):
            assert sorted(set(offsets)) == offsets and offsets[0] >= 0 and offsets[-1] < len(d["tokens"])
    if spec.startswith("blend:"):  # the question's focus from blend's probe, the most-attended token at 1
        assert all(len(s["focus"]) == len(s["tokens"]) for s in view)
        assert max(max(d["focus"]) for d in docs) == 1.0 and all(0 <= f <= 1 for d in docs for f in d["focus"])
    else:
        assert all("focus" not in s for s in view)


def test_the_default_response_has_no_token_view(server, doc_ids):
    ext = chat(server, doc_ids).json()["kvstash"]
    assert "token_view" not in ext and ext["reuse"] == "blend" and ext["reused_tokens"] > 0


def test_a_streamed_answer_ends_with_the_kvstash_field(server, doc_ids):
    body = {"messages": [{"role": "user", "content": QUESTION}], "documents": doc_ids, "max_tokens": 4}
    body |= {"stream": True, "stream_options": {"include_usage": True}, "reuse": "naive", "token_view": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S) as r:
        chunks = [json.loads(ln[5:]) for ln in r.iter_lines() if ln.startswith("data:") and ln != "data: [DONE]"]
    finish = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert len(finish) == 1 and [c for c in chunks if "kvstash" in c] == finish
    ext = finish[0]["kvstash"]
    assert ext["reuse"] == "naive" and ext["ttft_s"] > 0 and ext["tier_hits"]["ram"] >= 2 and "answer" not in ext
    assert ext["reused_tokens"] == sum(s["reused"] for s in ext["token_view"])
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == ext["reused_tokens"]


# --- the page in a browser -------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"),
    # without these Chromium's own background connections are refused on a closed network and it stalls
    *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
]
SCREENSHOT_ENV = "KVSTASH_SCREENSHOT"  # where to write the comparison view's screenshot (make screenshot)
WAIT_MS = REQUEST_TIMEOUT_S * 1000


def _browser():
    """Playwright's sync API and the Chromium path, or a skip saying how to install what is missing."""
    if not Path(CHROMIUM).is_file():
        pytest.skip("the browser tests need Chromium: run `make setup` or `bash scripts/install-chromium.sh`")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("the browser tests need Playwright: run `make setup` or `.venv/bin/pip install -e '.[dev]'`")
    return sync_playwright, expect


@pytest.mark.browser
def test_the_playground_in_a_browser(server, tmp_path):
    """The last test of the module: it stops the server at the end to see the page say so."""
    sync_playwright, expect = _browser()
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            errors = _console_errors(page)
            page.goto(server.url + "/")
            expect(page.locator("#model")).to_contain_text("smollm2-135m")
            _documents(page, expect, tmp_path)
            _ask(page, expect)
            _compare(page, expect, tmp_path)
            _delete(page, expect, server)
            assert errors == [], errors
            server.stop()  # the server goes away: the page says so, and stays as it was
            page.locator("#ask").click()
            expect(page.locator("#status")).to_contain_text("Cannot reach the kvstash server")
            expect(page.locator("#cmp-summary")).to_contain_text("TTFT speedup")
            # the only errors now: Chromium's own log line for each refused connection, none from the page's script
            assert all("ERR_CONNECTION_REFUSED" in e for e in errors), errors
        finally:
            browser.close()


def _console_errors(page) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    return errors


def _documents(page, expect, tmp_path: Path) -> None:
    """Bad input first (nothing reaches the server), then two documents: one pasted, one from a file."""
    status, items = page.locator("#status"), page.locator("#doc-list li")
    page.locator("#add-doc").click()
    expect(status).to_contain_text("The document is empty")
    page.locator("#question").fill(QUESTION)
    page.locator("#ask").click()
    expect(status).to_contain_text("No documents yet")
    page.locator("#doc-text").fill(CURIE)
    page.locator("#add-doc").click()
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text("1 chunk")
    (tmp_path / "eiffel.md").write_text(EIFFEL)
    page.locator("#doc-files").set_input_files(tmp_path / "eiffel.md")
    expect(items).to_have_count(2)
    expect(status).to_contain_text("Added eiffel.md")
    items.nth(1).get_by_role("button", name="move up").click()  # Eiffel first, then Curie
    expect(items.first).to_contain_text("eiffel.md")
    items.nth(0).get_by_role("button", name="move down").click()
    expect(items.first).to_contain_text("Marie Curie")
    for box in page.locator("#doc-list input[type=checkbox]").all():
        box.uncheck()
    page.locator("#ask").click()
    expect(status).to_contain_text("No documents selected")
    for box in page.locator("#doc-list input[type=checkbox]").all():
        box.check()


def _ask(page, expect) -> None:
    """One question with blend: the answer arrives in several pieces, then its numbers and the token view."""
    page.locator("#max-tokens").fill("24")
    page.evaluate(
        """() => {
            window.answerUpdates = 0;
            new MutationObserver(() => window.answerUpdates++).observe(
                document.getElementById("answer"), {childList: true, characterData: true, subtree: true});
        }"""
    )
    page.locator("#ask").click()
    expect(page.locator("#status")).to_contain_text("Answered with blend:0.15")
    assert page.locator("#answer").inner_text().strip()
    assert page.evaluate("window.answerUpdates") >= 3  # cleared, then streamed text, then the final text
    expect(page.locator("#answer-stats")).to_contain_text("TTFT (browser)")
    expect(page.locator("#answer-stats")).to_contain_text("ram")


def _compare(page, expect, tmp_path: Path) -> None:
    """Full prefill and blend side by side, blend's recomputed tokens highlighted; the screenshot."""
    page.locator("#compare").click()
    expect(page.locator("#status")).to_contain_text("Compared full prefill with blend:0.15")
    expect(page.locator("#cmp-summary")).to_contain_text("TTFT speedup")
    expect(page.locator("#cmp-summary")).to_contain_text(re.compile("answers (agree|differ)"))
    for col in ("#cmp-full", "#cmp-blend"):
        assert page.locator(f"{col} .answer").inner_text().strip()
        expect(page.locator(f"{col} .stats")).to_contain_text("recomputed tokens")
    docs = page.locator("#tokens .seg.document")
    expect(docs).to_have_count(2)
    marked, tokens = docs.locator(".tok.rc").count(), docs.locator(".tok").count()
    assert marked == round(0.15 * tokens)  # blend's budget, all of it in the documents
    expect(page.locator("#m-requests")).not_to_have_text("–")  # the metrics panel polled after the answers
    out = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "playground.png")
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 10_000
    page.locator("#show-focus").check()  # the question's attention as a heat map
    expect(page.locator("#tokens")).to_have_class("heat")


def _delete(page, expect, server: ServerProcess) -> None:
    items = page.locator("#doc-list li")
    doc_id = items.first.get_attribute("data-id")
    items.first.get_by_role("button", name="delete").click()
    expect(items).to_have_count(1)
    expect(page.locator("#status")).to_contain_text("Document deleted")
    assert httpx.get(f"{server.url}/v1/documents/{doc_id}").status_code == 404


@pytest.mark.browser
def test_the_playground_asks_for_the_api_key():
    """A server started with --api-key: the page asks for the key on the first 401, refuses a wrong one, keeps
    the right one in the browser (it is sent on every API call, and still there after a reload)."""
    sync_playwright, expect = _browser()
    expect.set_options(timeout=WAIT_MS)
    key = "sk-playground-test"
    with running_server("--api-key", key) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            status, form = page.locator("#status"), page.locator("#key-form")
            expect(status).to_contain_text("missing API key")
            expect(form).to_be_visible()
            expect(page.locator("#model")).to_have_text("")
            page.locator("#api-key").fill("wrong")
            page.locator("#save-key").click()
            expect(status).to_contain_text("invalid API key")
            page.locator("#api-key").fill(key)
            page.locator("#save-key").click()
            expect(status).to_contain_text("API key accepted")
            expect(page.locator("#model")).to_contain_text("smollm2-135m")
            expect(form).to_be_hidden()
            page.locator("#doc-text").fill(CURIE)
            page.locator("#add-doc").click()
            expect(page.locator("#doc-list li")).to_have_count(1)
            page.locator("#question").fill(QUESTION)
            page.locator("#max-tokens").fill("8")
            page.locator("#ask").click()  # a streamed chat, with the key
            expect(status).to_contain_text("Answered with blend:0.15")
            assert page.evaluate("localStorage.getItem('kvstash.apiKey')") == key
            page.reload()
            expect(page.locator("#model")).to_contain_text("smollm2-135m")
            expect(form).to_be_hidden()
            expect(page.locator("#doc-list li")).to_have_count(1)  # the document is still known: read with the key
        finally:
            browser.close()
