"""The CLI parses, calls the library and prints what it promised."""

from __future__ import annotations

import json

import pytest

from kvstash.cli import build_parser, main


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
