"""The benchmark run loop: every method on every example, greedy, with full prefill as the reference.

Per example: full prefill runs first; its greedy answer is the reference. Every other method then answers
the same prompt (timed: ``GenerationResult.ttft_s``, store loads included) and is prefilled once more to
score its next-token logits teacher-forced along the reference answer (KL(full || method)).

Store state, and why it is fair. The CacheBlend experiment measures TTFT with every chunk's KV already in
the RAM store. Here each method family gets its own engine view over the shared weights with its own RAM
store (``Engine(config, loaded=engine.lm)``), cleared and warmed once per example:

- ``naive`` / ``blend`` / ``cacheblend`` (family "chunk"): warmed with one untimed prefill by each of the
  family's methods, so the store holds every document's chunk KV and the shared head (template glue + system prompt) in
  context. Documents are reused out of prefix position, as when the same passages were retrieved for other
  prompts.
- ``prefix`` (family "prefix"): warmed with a ``prefix`` prefill of the first document alone, so the store
  holds the head and the first document in context, as if each passage had been retrieved first in an
  earlier prompt; exact reuse can then take the head and the first document, no more (CacheBlend's
  prefix-caching baseline). Sharing one store would be unfair both ways: prefix's in-context entries for the
  whole run of documents would let naive/blend load an exact prefix instead of reusing out of position.
- Every measured call runs inside a rollback of its store (keys it added are deleted afterwards), so the
  timed run and the KL prefill both see exactly the warm state; e.g. prefix's timed run caches the rest of
  the prompt in context, which would otherwise make its KL prefill an exact hit of everything.

With ``concurrency`` N > 1 each method answers N examples at a time through :meth:`Engine.generate_many`
(continuous batching; the family's store warmed for all N), so TTFT is measured under that load and the
summaries' ``requests_per_s`` is the method's throughput; greedy answers, and the KL prefills (one example at
a time, as before), do not change.

Before timing, every method runs once on a small prompt (thread pools, allocator, transformers' first
``generate``), so medians and p90 are after warm-up.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm import tqdm

from kvstash.batch.scheduler import BatchConfig
from kvstash.bench.baselines import HFGenerate, Measured
from kvstash.bench.datasets import Example, load_dataset
from kvstash.bench.methods import DEFAULT_METHODS, QUICK_METHODS, MethodSpec, parse_methods
from kvstash.bench.metrics import answers_agree, contains_gold, f1_score, kl_divergence
from kvstash.engine import Engine
from kvstash.prompt import PromptPlan, Segment
from kvstash.sampling import SamplingParams

BENCH_STORE = "ram:4GiB"  # each family's store: every chunk of one example fits many times over
QUICK = {"n": 3, "passages": 3, "max_tokens": 16, "methods": QUICK_METHODS}
QUALITY_METRIC = {"musique": "f1", "wikimqa": "f1"}  # multi-hop sets: F1; the rest: contains-gold accuracy


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run, validated once."""

    dataset: str
    methods: tuple[MethodSpec, ...] = field(default_factory=lambda: parse_methods(DEFAULT_METHODS))
    n: int = 20
    passages: int = 6
    max_tokens: int = 32
    seed: int = 0
    data_dir: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)  # gold_position (nq/squad/kv), depth (needle)
    warmup: bool = True  # run every method once on a small prompt before timing
    concurrency: int = 1  # examples whose answers are generated together (Engine.generate_many); 1: one by one
    progress: bool = True  # progress bar with ETA on stderr
    command: str = ""  # the command line, recorded in results.json

    def __post_init__(self) -> None:
        for name in ("n", "passages", "max_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.methods or not self.methods[0].is_reference:
            raise ValueError("methods must start with plain 'full' (the reference); build them with parse_methods")

    @classmethod
    def quick(cls, dataset: str, **overrides) -> BenchConfig:
        """The CI-sized run: 3 examples of 3 passages, 16 tokens, full/naive/blend:0.15/hf."""
        opts = {**QUICK, **{k: v for k, v in overrides.items() if v is not None}}
        if isinstance(opts["methods"], str):
            opts["methods"] = parse_methods(opts["methods"])
        return cls(dataset, **opts)

    @property
    def quality_metric(self) -> str:
        return QUALITY_METRIC.get(self.dataset, "accuracy")


@dataclass
class BenchResult:
    config: dict[str, Any]
    methods: list[dict[str, Any]]  # one summary per method (see report.summarize_methods)
    examples: list[dict[str, Any]]  # one row per example and method


@dataclass(frozen=True)
class Case:
    """One example made into a prompt."""

    key: str
    example: Example
    segments: list[Segment]
    plan: PromptPlan


@contextmanager
def _rollback(store) -> Iterator[None]:
    """Delete every key ``store`` gains inside the block, so the next call sees the same state."""
    before = set(store.keys())
    try:
        yield
    finally:
        for key in set(store.keys()) - before:
            store.delete(key)


class _Family:
    """An engine view over the shared weights with its own chunk store, warmed for one example at a time."""

    def __init__(self, engine: Engine, kind: str, codec: str | None):
        self.kind = kind  # "chunk" (naive, blend) | "prefix" | "none" (full: reads no store)
        config = replace(engine.config, store=BENCH_STORE, codec=codec or engine.config.codec)
        self.engine = engine if kind == "none" and codec is None else Engine(config, loaded=engine.lm)
        self.members: list = []  # the reuse methods that read this store; each warms it
        self._warm_for: str | None = None

    def store(self):
        return self.engine.store if self.kind != "none" else None

    def warm(self, cases: list[Case]) -> None:
        """Clear the store and fill it with the state described in the module docstring, for every one of
        ``cases`` (those generated together), once per group."""
        key = tuple(c.key for c in cases)
        if self.kind == "none" or self._warm_for == key:
            return
        self.store().clear()
        for case in cases:
            if self.kind == "chunk":
                for method in self.members:
                    self.engine.prefill(case.plan, method)
            else:
                self.engine.prefill(self.engine.plan([case.segments[0], case.segments[-1]]), "prefix")
        self._warm_for = key


class _EngineMethod:
    """A method run by the kvstash engine (through its family's engine view)."""

    def __init__(self, spec: MethodSpec, family: _Family, params: SamplingParams):
        self.spec, self.family, self.params = spec, family, params
        self.method = family.engine.method(spec.reuse)
        family.members.append(self.method)

    def run(self, cases: list[Case], reference_ids: list[list[int] | None]) -> list[Measured]:
        """Timed generation of every case (together through :meth:`Engine.generate_many` when there are
        several), then per case a prefill scored along its ``reference_ids`` (None: this method's own answer)."""
        self.family.warm(cases)
        engine, kw, store = self.family.engine, self.spec.engine_kwargs, self.family.store()
        speculate = "ngram" if self.spec.speculate else "off"
        t = time.perf_counter()
        with _rollback(store) if store is not None else nullcontext():
            if len(cases) == 1:
                results = [engine.generate(cases[0].segments, self.params, self.method, speculate=speculate, **kw)]
            else:
                batch = BatchConfig(max_batch=len(cases))
                plans = [c.plan for c in cases]
                results = engine.generate_many(plans, self.params, self.method, batch=batch, speculate=speculate, **kw)
        share = (time.perf_counter() - t) / len(cases)
        return [self._score(c, res, ids, share) for c, res, ids in zip(cases, results, reference_ids, strict=True)]

    def _score(self, case: Case, res, reference_ids: list[int] | None, gen_s: float) -> Measured:
        engine, kw, store = self.family.engine, self.spec.engine_kwargs, self.family.store()
        ids = res.token_ids if reference_ids is None else reference_ids
        with _rollback(store) if store is not None else nullcontext():
            pre = engine.prefill(case.plan, self.method, **kw)
            kv_bytes = int(pre.cache.nbytes)
            logits = engine.teacher_forced_logits(pre, ids)
        r, n = res.prefill, res.completion_tokens
        forwards = n - 1 - (res.speculation["accepted"] if res.speculation else 0)  # decoding passes
        per_forward = (n - 1) / forwards if forwards > 0 else None
        return Measured(
            res.token_ids, res.text, res.ttft_s, logits, r.recomputed_tokens, r.reused_tokens, kv_bytes,
            res.decode_tok_s, per_forward, gen_s,
        )  # fmt: skip


class _HFMethod:
    def __init__(self, spec: MethodSpec, engine: Engine, max_tokens: int):
        self.spec = spec
        lm = engine.lm
        self.hf = HFGenerate(
            lm.model, lm.tokenizer, engine.eos_ids, max_tokens, spec.reuse == "hf-prefix", spec.reuse == "hf-lookup"
        )

    def run(self, cases: list[Case], reference_ids: list[list[int] | None]) -> list[Measured]:
        """One case at a time (transformers' generate is not batched here)."""
        assert None not in reference_ids, "a baseline is never the reference"
        return [self.hf.run(case.plan, ids) for case, ids in zip(cases, reference_ids, strict=True)]


def _family_kind(spec: MethodSpec) -> str:
    return {"prefix": "prefix", "naive": "chunk", "blend": "chunk", "cacheblend": "chunk"}.get(spec.base, "none")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Bench:
    """Runs every method of a config on examples and scores them against full prefill."""

    def __init__(self, engine: Engine, config: BenchConfig):
        self.engine, self.config = engine, config
        params = SamplingParams(max_tokens=config.max_tokens)  # greedy
        families: dict[tuple[str, str | None], _Family] = {}
        self.methods: list[_EngineMethod | _HFMethod] = []
        for spec in config.methods:
            if spec.is_baseline:
                self.methods.append(_HFMethod(spec, engine, config.max_tokens))
                continue
            key = (_family_kind(spec), spec.codec)
            if key not in families:
                families[key] = _Family(engine, *key)
            self.methods.append(_EngineMethod(spec, families[key], params))

    def case(self, example: Example, key: str | None = None) -> Case:
        segments = [Segment(d) for d in example.documents] + [Segment(example.question, "user")]
        return Case(key or example.id, example, segments, self.engine.plan(segments))

    def warm_up(self, example: Example) -> None:
        """Run every method once on a short version of ``example``; nothing is recorded."""
        small = replace(example, documents=[d[:400] for d in example.documents[:2]])
        self.run_case(self.case(small, key="warm-up"))

    def run_case(self, case: Case, bar: tqdm | None = None) -> list[dict[str, Any]]:
        """One row per method for ``case``; the first method is full prefill, the reference."""
        return self.run_cases([case], bar)

    def run_cases(self, cases: list[Case], bar: tqdm | None = None) -> list[dict[str, Any]]:
        """:meth:`run_case` for cases whose answers each method generates together; rows by case, then method."""
        rows: list[list[dict[str, Any]]] = [[] for _ in cases]
        refs: list[Measured] | None = None
        for m in self.methods:
            if bar is not None:
                bar.set_postfix_str(f"{cases[0].key} {m.spec.name}", refresh=False)
            measured = m.run(cases, [None] * len(cases) if refs is None else [r.token_ids for r in refs])
            refs = refs or measured
            for out, case, ref, mine in zip(rows, cases, refs, measured, strict=True):
                out.append(self.score(m.spec, case, ref, mine))
            if bar is not None:
                bar.update(len(cases))
        return [row for case_rows in rows for row in case_rows]

    def score(self, spec: MethodSpec, case: Case, ref: Measured, m: Measured) -> dict[str, Any]:
        ex = case.example
        kl = kl_divergence(ref.logits[: len(m.logits)], m.logits).mean()
        return {
            "id": ex.id,
            "method": spec.name,
            "answer": m.text,
            "gold": ex.answers,
            "ttft_s": m.ttft_s,
            "f1": f1_score(m.text, ex.answers),
            "contains": contains_gold(m.text, ex.answers),
            "agree": answers_agree(m.text, ref.text),
            "kl": float(kl),
            "kl_tokens": len(m.logits),
            "prompt_tokens": len(case.plan),
            "recomputed_tokens": m.recomputed_tokens,
            "reused_tokens": m.reused_tokens,
            "kv_bytes": m.kv_bytes,
            "decode_tok_s": m.decode_tok_s,
            "tokens_per_forward": m.tokens_per_forward,
            "completion_tokens": len(m.token_ids),
            "gen_s": m.gen_s,
            "divergence": _divergence(ref, m),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            **{k: v for k, v in ex.meta.items() if k in ("gold_index", "depth")},
        }


def _divergence(ref: Measured, m: Measured) -> dict | None:
    """Where ``m``'s answer first leaves the reference's (token index), and how close the reference's choice
    was there: its top-1 minus top-2 logit (a near tie flips on rounding alone). None when they agree."""
    a, b = ref.token_ids, m.token_ids
    i = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    if a == b or i >= len(ref.logits):
        return None
    top = torch.topk(ref.logits[i].float(), 2).values
    return {"at": i, "gap": round(float(top[0] - top[1]), 4)}


def run_bench(engine: Engine, config: BenchConfig) -> BenchResult:
    """Load the dataset, warm up, run every method on every example and summarize.

    Raises ValueError / FileNotFoundError from the dataset loader for bad options or missing data.
    """
    from kvstash.bench.report import summarize_methods

    torch.manual_seed(config.seed)
    c = config
    examples = load_dataset(
        c.dataset, n=c.n, passages=c.passages, seed=c.seed, data_dir=c.data_dir, **c.dataset_options
    )
    bench = Bench(engine, config)
    t0 = time.perf_counter()
    if config.warmup and examples:
        bench.warm_up(examples[0])
    rows: list[dict[str, Any]] = []
    total = len(examples) * len(bench.methods)
    with tqdm(total=total, desc=c.dataset, unit="run", disable=not c.progress, dynamic_ncols=True) as bar:
        for i in range(0, len(examples), c.concurrency):
            rows += bench.run_cases([bench.case(ex) for ex in examples[i : i + c.concurrency]], bar)
    return BenchResult(_config_dict(engine, config, time.perf_counter() - t0), summarize_methods(rows, c.methods), rows)


def _config_dict(engine: Engine, c: BenchConfig, elapsed: float) -> dict[str, Any]:
    import transformers

    return {
        "command": c.command,
        "dataset": c.dataset,
        "n": c.n,
        "passages": c.passages,
        "seed": c.seed,
        "max_tokens": c.max_tokens,
        "concurrency": c.concurrency,
        "methods": [m.name for m in c.methods],
        "dataset_options": dict(c.dataset_options),
        "quality_metric": c.quality_metric,
        "model": engine.lm.name,
        "dtype": engine.config.dtype,
        "store": BENCH_STORE,
        "codec": engine.config.codec,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "elapsed_s": round(elapsed, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
