"""The benchmark harness: method specs, summaries, a quick end-to-end run."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from kvstash.bench.methods import MethodSpec, parse_method, parse_methods
from kvstash.bench.report import markdown_table, summarize_methods, write_all
from kvstash.bench.runner import BenchConfig, run_bench
from kvstash.cli import build_parser, main


def _rows():
    def row(method, ttft, contains, agree, kl):
        return {
            "method": method, "ttft_s": ttft, "contains": contains, "f1": float(contains), "agree": agree,
            "kl": kl, "prompt_tokens": 100, "recomputed_tokens": 100 if method == "full" else 10,
            "reused_tokens": 0 if method == "full" else 90, "kv_bytes": 2**20, "peak_rss_mb": 500.0,
            "gen_s": ttft + 1.0, "completion_tokens": 8,
        }  # fmt: skip

    return [
        row("full", 2.0, True, True, 0.0),
        row("full", 4.0, False, True, 0.0),
        row("full", 3.0, True, True, 0.0),
        row("naive", 0.5, True, False, 0.3),
        row("naive", 1.5, False, True, 0.1),
        row("naive", 1.0, False, True, 0.2),
    ]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A musique-format file with short passages: the needle haystack for a fast run."""
    topics = ["river", "castle", "violin", "glacier", "harbor", "orchard", "comet", "library"]
    rows = [
        {
            "id": f"t{i}",
            "question": "q?",
            "answers": ["a"],
            "ctxs": [{"title": t.title(), "text": f"The {t} is old. It is known in the region. People visit it."}],
        }
        for i, t in enumerate(topics)
    ]
    d = tmp_path_factory.mktemp("data")
    (d / "musique_s.json").write_text(json.dumps(rows))
    return d


@pytest.fixture
def one_thread():
    """One torch thread for the run: two threads slow down several-fold while other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("spec", "reuse", "codec", "kv_bits", "evict"),
    [
        ("full", "full", None, None, None),
        ("blend:0.15", "blend:0.15", None, None, None),
        ("full+kivi4", "full", "kivi4", None, None),
        ("full@kv4", "full", None, 4, None),
        ("full@snapkv:0.25", "full", None, None, "snapkv:0.25"),
        ("blend:0.3+kivi2@kv8@h2o:512", "blend:0.3", "kivi2", 8, "h2o:512"),
        ("hf-prefix", "hf-prefix", None, None, None),
    ],
)
def test_parse_method(spec, reuse, codec, kv_bits, evict):
    m = parse_method(spec)
    assert (m.name, m.reuse, m.codec, m.kv_bits, m.evict) == (spec, reuse, codec, kv_bits, evict)


def test_engine_kwargs_only_when_set():
    assert parse_method("blend").engine_kwargs == {}
    assert parse_method("full@kv4@snapkv:0.25").engine_kwargs == {"kv_bits": 4, "evict": "snapkv:0.25"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fast", "unknown reuse method"),
        ("naive:0.2", "only blend and cacheblend take a ratio"),
        ("blend+zip", "unknown codec"),
        ("blend+", "followed by a codec"),
        ("full@turbo", "unknown modifier"),
        ("hf@kv4", "baselines take no"),
        ("full@kv32", "1..16"),
    ],
)
def test_parse_method_errors_say_what_to_do(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_method(spec)


def test_parse_methods_puts_the_full_reference_first():
    assert [m.name for m in parse_methods("naive, full,blend:0.15")] == ["full", "naive", "blend:0.15"]
    assert [m.name for m in parse_methods("blend,full@kv4")] == ["full", "blend", "full@kv4"]
    with pytest.raises(ValueError, match="listed twice: naive"):
        parse_methods("naive,full,naive")
    with pytest.raises(ValueError, match="no methods"):
        parse_methods(" , ")


def test_summarize_methods_medians_speedup_rates():
    full, naive = summarize_methods(_rows(), parse_methods("full,naive"))
    assert (full["ttft_s"], full["speedup_vs_full"], full["agreement"], full["kl"]) == (3.0, 1.0, 1.0, 0.0)
    assert full["ttft_p90_s"] == pytest.approx(3.8)
    assert (naive["ttft_s"], naive["speedup_vs_full"]) == (1.0, 3.0)
    assert naive["accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    assert naive["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert naive["kl"] == pytest.approx(0.2)
    assert (naive["recomputed_tokens"], naive["reused_tokens"], naive["n"]) == (10, 90, 3)
    # throughput of the generate calls: 3 answers of 8 tokens in (1.5 + 2.5 + 2.0) s
    assert (naive["requests_per_s"], naive["completion_tok_s"]) == (0.5, 4.0)


def test_markdown_table_formats_every_column():
    methods = summarize_methods(_rows(), parse_methods("full,naive"))
    lines = markdown_table(methods).splitlines()
    assert lines[0].startswith("| method | TTFT med (s) | TTFT p90 (s) | speedup |")
    assert lines[1] == "|" + "---|" * 15
    want = "| naive | 1.000 | 1.400 | 3.00x | 10 | 90 | 0.33 | 0.333 | 0.67 | 0.2000 | 1.0 | 0.0 | 0.500 | — | — |"
    assert lines[3] == want


def test_speculation_columns_compare_with_the_plain_method():
    rows = []
    for i, (plain, spec) in enumerate([("a", "a"), ("b", "b"), ("c", "x"), ("d", "d")]):
        base = {"id": str(i), "ttft_s": 1.0, "contains": True, "f1": 1.0, "agree": True, "kl": 0.0}
        base |= {"prompt_tokens": 10, "recomputed_tokens": 10, "reused_tokens": 0, "kv_bytes": 1, "peak_rss_mb": 1.0}
        rows.append({**base, "method": "full", "answer": plain, "decode_tok_s": 20.0, "tokens_per_forward": 1.0})
        rows.append(
            {**base, "method": "full+spec", "answer": spec, "decode_tok_s": 40.0 + i, "tokens_per_forward": 2.5}
        )
    full, spec = summarize_methods(rows, parse_methods("full,full+spec"))
    assert full["same_as_plain"] is None and full["speculate"] is False
    assert (spec["same_as_plain"], spec["decode_tok_s"], spec["tokens_per_forward"]) == (0.75, 41.5, 2.5)


def test_quick_run_writes_table_json_csv_png(engine, tiny_data, tmp_path, one_thread):
    config = BenchConfig.quick(
        "needle", n=2, passages=2, max_tokens=4, data_dir=str(tiny_data), progress=False, warmup=False,
        methods="full,prefix,naive,blend:0.15,hf,hf-prefix",
    )  # fmt: skip
    result = run_bench(engine, config)
    paths = write_all(result, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["config"]["dataset"] == "needle" and data["config"]["n"] == 2
    by_name = {m["method"]: m for m in data["methods"]}
    assert list(by_name) == ["full", "prefix", "naive", "blend:0.15", "hf", "hf-prefix"]
    for m in data["methods"]:
        for key in ("ttft_s", "ttft_p90_s", "speedup_vs_full", "agreement", "accuracy", "f1", "kl", "kv_bytes"):
            assert m[key] is not None, (m["method"], key)
    full = by_name["full"]
    assert (full["speedup_vs_full"], full["agreement"], full["kl"]) == (1.0, 1.0, 0.0)
    assert full["reused_tokens"] == 0 and full["recomputed_tokens"] == full["prompt_tokens"]
    # the transformers baselines compute the same greedy answer as full prefill
    assert by_name["hf"]["agreement"] == 1.0 and by_name["hf"]["kl"] < 1e-6
    # warm store: naive reuses every document and the head; prefix only the head and the first document
    examples = [r for r in data["examples"] if r["method"] in ("naive", "prefix")]
    for r in examples:
        assert 0 < r["reused_tokens"] < r["prompt_tokens"]
    assert by_name["naive"]["reused_tokens"] > by_name["prefix"]["reused_tokens"]
    assert len(data["examples"]) == 2 * 6
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["method"] for r in rows] == list(by_name) and float(rows[0]["speedup_vs_full"]) == 1.0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown_table(data["methods"]).count("\n") == 1 + 6


def test_bench_cli_help_and_missing_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--methods" in out and "full@kv4" in out and "hf-prefix" in out
    assert main(["bench", "nq", "--quick", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nq_open_oracle.json") in err


def test_bench_config_validates():
    with pytest.raises(ValueError, match="n must be >= 1"):
        BenchConfig("needle", n=0)
    with pytest.raises(ValueError, match="start with plain 'full'"):
        BenchConfig("needle", methods=(MethodSpec("naive", "naive"),))


def test_bench_spec_kv4mixed() -> None:
    m = parse_method("blend:0.15@kv4mixed")
    assert (m.kv_bits, m.kv_alloc) == (4, "mixed")
    assert m.engine_kwargs == {"kv_bits": 4, "kv_alloc": "mixed"}
    assert parse_method("full@kv4").engine_kwargs == {"kv_bits": 4}
    with pytest.raises(ValueError, match="use @kv4mixed"):
        parse_method("full@kv2mixed")


def test_examples_generated_together_give_the_same_answers_and_kl(engine, tiny_data, one_thread):
    """--concurrency: each method answers several examples at once through generate_many (a group of 2, then
    the last one alone); greedy answers and the KL scoring equal the run one example at a time, and every
    kvstash method reports its throughput."""
    common = {"n": 3, "passages": 2, "max_tokens": 4, "data_dir": str(tiny_data), "progress": False,
              "warmup": False, "methods": "full,prefix,blend:0.15,full+spec"}  # fmt: skip
    alone = run_bench(engine, BenchConfig.quick("needle", **common))
    together = run_bench(engine, BenchConfig.quick("needle", concurrency=2, **common))
    assert together.config["concurrency"] == 2 and alone.config["concurrency"] == 1

    def by_key(result):
        return {(r["id"], r["method"]): r for r in result.examples}

    a, b = by_key(alone), by_key(together)
    assert list(a) == list(b) and len(a) == 3 * 4  # the same rows in the same order
    for key, row in a.items():
        assert b[key]["answer"] == row["answer"], key
        assert b[key]["kl"] == pytest.approx(row["kl"], abs=1e-6), key
        assert b[key]["gen_s"] > 0 and b[key]["completion_tokens"] == row["completion_tokens"]
    for m in together.methods:
        assert m["requests_per_s"] > 0 and m["completion_tok_s"] > 0


def test_concurrency_must_be_positive():
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        BenchConfig("needle", concurrency=0)
