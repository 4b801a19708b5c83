"""kvstash ask / demo / models: answers, JSON, flags, clear errors, --help everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kvstash
from kvstash.cli import build_parser, main

QUESTION = "Which elements did Marie Curie discover?"


def test_ask_json_answers_paris(capsys):
    assert main(["ask", "What is the capital of France?", "--json", "--max-tokens", "24"]) == 0
    out = json.loads(capsys.readouterr().out)
    for field in ("answer", "prompt_tokens", "completion_tokens", "ttft_s", "decode_tok_s"):
        assert field in out
    assert "paris" in out["answer"].lower()


def test_ask_text_prints_answer_then_timings(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The secret code of the blue project is 4417.")
    assert main(["ask", "What is the secret code of the blue project?", "--doc", str(doc), "--max-tokens", "20"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "4417" in lines[0]
    assert lines[-1].startswith("[prompt ") and "ttft" in lines[-1]


@pytest.mark.parametrize(
    "reuse",
    [
        ["--reuse", "cacheblend"],
        ["--reuse", "blend", "--query-share", "1.0"],
        ["--reuse", "blend", "--stale-bias", "0"],
        ["--reuse", "blend", "--probe-layers", "4"],
        ["--reuse", "blend", "--focus", "recent"],
        ["--reuse", "blend", "--budget", "work"],
        ["--reuse", "blend", "--spans", "1", "--span-width", "2"],
        ["--reuse", "blend:auto"],
    ],
)
def test_ask_blend_flavours_over_a_store(tmp_path, capsys, reuse):
    docs = []
    for i, text in enumerate(["The Danube flows into the Black Sea.", "The secret code of the blue project is 4417."]):
        docs += ["--doc", str(tmp_path / f"d{i}.txt")]
        (tmp_path / f"d{i}.txt").write_text(text)
    store = ["--store", f"disk:{tmp_path / 'kv'}"]
    args = ["ask", "What is the secret code of the blue project?", *docs, *store, "--json", "--max-tokens", "8"]
    assert main([*args, *reuse, "--ratio", "0.5"]) == 0  # computes the chunks and stores them
    capsys.readouterr()
    assert main([*args, *reuse, "--ratio", "0.5"]) == 0  # reuses them
    out = json.loads(capsys.readouterr().out)
    assert out["reuse"] == reuse[1].removesuffix(":auto")
    assert out["reused_tokens"] > 0 and out["recomputed_tokens"] < out["prompt_tokens"]
    if reuse[1] == "blend:auto":  # --ratio caps the ratio it picks
        assert 0.03 <= out["blend_ratio"] <= 0.5
    else:
        assert out["blend_ratio"] == 0.5
    assert all(s["tier"] == "disk" for s in out["segments"] if s["kind"] == "document")  # read layer by layer


def test_missing_doc_and_unknown_model_are_clear_errors(capsys):
    with pytest.raises(SystemExit, match="no such file"):
        main(["ask", "q", "--doc", "/nonexistent/doc.txt"])
    assert main(["ask", "q", "--model", "no-such-model"]) == 2
    assert "smollm2-135m" in capsys.readouterr().err


def test_models_lists_default(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "smollm2-135m" and rows[0]["default"]


@pytest.mark.parametrize("cmd", ["ask", "models", "demo"])
def test_help_everywhere(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_cli_kv_bits_and_evict(capsys) -> None:
    import json
    from pathlib import Path

    import kvstash
    from kvstash.cli import main

    doc = str(Path(kvstash.__file__).parent / "demo_docs" / "curie.txt")
    args = ["ask", QUESTION, "--doc", doc, "--max-tokens", "2", "--json"]
    assert main([*args, "--kv-bits", "4", "--evict", "streaming:0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 < out["kv_bytes"] < 2 * 30 * 3 * 64 * 2 * out["prompt_tokens"] / 2  # under half of fp16
    assert main([*args, "--evict", "snapkv:2.5"]) == 2
    assert "budget '2.5'" in capsys.readouterr().err


def test_cli_kv_alloc(capsys) -> None:
    from kvstash.cli import main

    doc = str(Path(kvstash.__file__).parent / "demo_docs" / "curie.txt")
    args = ["ask", QUESTION, "--doc", doc, "--max-tokens", "2", "--json", "--kv-bits"]
    assert main([*args, "4", "--kv-alloc", "mixed"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert torch.tensor(out["kv_head_bits"]).shape == (30, 3, 2)
    assert main([*args, "2", "--kv-alloc", "mixed"]) == 2
    assert "use it with --kv-bits 4" in capsys.readouterr().err
