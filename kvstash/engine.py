"""Engine: load a model, plan the prompt's segments, build its KV with a reuse method, compress it, decode."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, replace

import torch

from kvstash.batch.scheduler import BatchConfig, Scheduler
from kvstash.compress.pipeline import Compression
from kvstash.decoding import Decoding, GenerationResult
from kvstash.model.dtype import resolve_dtype, warn_if_emulated
from kvstash.model.registry import DEFAULT_MODEL, LoadedModel, load_model
from kvstash.model.runner import Runner
from kvstash.prompt import PromptBuilder, PromptPlan, Segment
from kvstash.reuse import DEFAULT_STORE, ChunkSource, Prefilled, ReuseMethod, make_method
from kvstash.reuse.source import IngestReport
from kvstash.sampling import SamplingParams
from kvstash.speculate.speculation import SpecConfig, Stepper
from kvstash.store import TieredStore, TierStats


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL  # registry name or local HF model directory
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16 | auto (bf16 where the CPU has it natively)
    threads: int | None = None  # torch CPU threads (None: torch's default)
    prefill_chunk: int = 512  # query tokens per forward during prefill (bounds attention memory)
    store: str = DEFAULT_STORE  # chunk store spec for the reuse methods, e.g. ram:4GiB,disk:DIR
    codec: str = "fp16"  # how chunk KV is encoded in the store
    speculate: str = "off"  # speculative decoding by default: off | ngram (each call may say otherwise)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype))  # ValueError naming the choices
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        SpecConfig.parse(self.speculate)  # ValueError naming the choices


class Generation:
    """A streaming generation: iterate for text deltas; ``result`` is set once iteration ends. ``close()`` (or
    closing the iterator) stops it between tokens."""

    def __init__(self, steps: Generator[str, None, GenerationResult]):
        self.result: GenerationResult | None = None
        self._it = self._run(steps)

    def _run(self, steps: Generator[str, None, GenerationResult]) -> Iterator[str]:
        self.result = yield from steps

    def __iter__(self) -> Iterator[str]:
        return self._it

    def close(self) -> None:
        """Stop generating (between tokens); ``result`` stays None."""
        self._it.close()


class Engine:
    """Loads a model once and answers prompts given as segments. Use as a context manager, or call
    :meth:`close`, to release the chunk store."""

    def __init__(self, config: EngineConfig | None = None, *, loaded: LoadedModel | None = None, **overrides):
        self.config = config or EngineConfig(**overrides)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        warn_if_emulated(self.config.dtype)
        self.lm = loaded or load_model(self.config.model, getattr(torch, self.config.dtype))
        self.runner = Runner(self.lm.model, block=self.config.prefill_chunk)
        self.builder = PromptBuilder(self.lm.tokenizer)
        self._chunks: ChunkSource | None = None  # opened on first use by a reuse method
        self.eos_ids = self._eos_ids()

    @property
    def chunks(self) -> ChunkSource:
        """The chunk store (``config.store``), opened on first use."""
        if self._chunks is None:
            self._chunks = ChunkSource.open(
                self.runner,
                self.lm.fingerprint,
                self.config.store,
                self.config.codec,
                prefill_chunk=self.config.prefill_chunk,
            )
        return self._chunks

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def ingest(self, texts: Iterable[str], progress: Callable[[int], None] | None = None) -> IngestReport:
        """Compute and store the standalone KV of each text as a document segment (chunks the store already
        holds are skipped), so later prompts that pass the same texts as documents reuse it. ``progress(tokens)``
        is called after each one."""
        return self.chunks.ingest((self.builder.tokenize(t, "document") for t in texts), progress)

    @property
    def store(self) -> TieredStore:
        """The chunk store itself (its tiers, keys, records), opened on first use."""
        return self.chunks.store

    def store_stats(self) -> list[TierStats]:
        """One :class:`TierStats` per tier of the chunk store, fastest first (opens the store if needed)."""
        return self.store.stats()

    def close(self) -> None:
        """Close the chunk store (connections, files). The engine may open it again on next use."""
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.lm.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids |= set(extra) if isinstance(extra, list) else {extra}
        return {i for i in ids if i is not None}

    # --- the steps of a request ------------------------------------------------------------------------------
    def plan(self, segments: list[Segment]) -> PromptPlan:
        """The prompt laid out and tokenized (each segment once). TypeError / ValueError for bad segments."""
        if not isinstance(segments, list | tuple) or not all(isinstance(s, Segment) for s in segments):
            raise TypeError("segments must be a list of kvstash.Segment")
        return self.builder.build(list(segments))

    def method(self, reuse: str | ReuseMethod | None, **opts) -> ReuseMethod:
        """A reuse method from a name (``full``, ``prefix``, ``naive``, ``blend``, ``blend:0.3``) or as given."""
        if isinstance(reuse, ReuseMethod):
            return reuse
        return make_method(reuse or "full", self.config.prefill_chunk, **opts)

    def check_length(self, plan: PromptPlan) -> None:
        """ValueError when the prompt leaves no room for one generated token in the model's context."""
        limit = self.lm.context_limit
        if len(plan) + 1 > limit:
            raise ValueError(
                f"prompt is {len(plan)} tokens but {self.lm.name} takes at most {limit} "
                f"(prompt + at least 1 generated token); shorten the documents or pass fewer"
            )

    def prefill(
        self, plan: PromptPlan, reuse: str | ReuseMethod | None = None, *, kv_bits=None, evict=None, kv_alloc=None
    ) -> Prefilled:
        """The prompt's cache and first-token logits; ``evict`` / ``kv_bits`` / ``kv_alloc`` compress the cache
        afterwards (see :meth:`stream`). ValueError for a prompt over the context or bad options."""
        self.check_length(plan)
        return self._prefill(plan, self.method(reuse), Compression.parse(kv_bits, evict, kv_alloc))

    def _prefill(self, plan: PromptPlan, method: ReuseMethod, comp: Compression) -> Prefilled:
        pre = method.prefill(self.runner, plan, self.chunks if method.needs_store else None)
        cache, evictor, head_bits = comp.apply(self.runner, pre.cache, plan.token_ids)
        pre.report.kv_head_bits = head_bits
        return replace(pre, cache=cache, decode_hook=evictor, prompt_ids=plan.token_ids)

    @torch.inference_mode()
    def teacher_forced_logits(self, pre: Prefilled, answer_ids: list[int]) -> torch.Tensor:
        """Next-token logits along a given answer after a prefill: row i is the distribution of answer token i
        given the prompt and answer[:i]. Returns [len(answer_ids), vocab]. Extends ``pre.cache``."""
        if len(answer_ids) < 2:
            return pre.last_logits[None]
        pos = pre.cache.next_position()
        ids = torch.tensor(answer_ids[:-1], dtype=torch.long)
        rest = self.runner.forward(ids, torch.arange(pos, pos + len(ids)), pre.cache, all_logits=True)
        return torch.cat([pre.last_logits[None], rest])

    def stream(
        self,
        prompt: list[Segment] | PromptPlan,
        params: SamplingParams | None = None,
        reuse=None,
        *,
        kv_bits=None,
        evict=None,
        kv_alloc=None,
        speculate: str | SpecConfig | None = None,
    ) -> Generation:
        """Start generating; iterate the returned Generation for text deltas. Errors in input raise here.

        ``prompt``: segments, or a plan from :meth:`plan` (so a caller that planned it already does not
        tokenize twice). ``evict`` (``"snapkv:0.25"``, an EvictionPolicy) and ``kv_bits`` (2, 4, 8, 16) compress
        the prompt's cache after prefill: evict first, then quantize; ``kv_alloc="mixed"`` (with ``kv_bits=4``)
        gives each KV head's keys and values 2, 4 or 8 bits by measured sensitivity, for uniform 4-bit's bytes.
        ``speculate`` (``"off"``, ``"ngram"``, a SpecConfig; None: the engine's default) drafts continuations
        from the prompt and the answer and verifies them several tokens per forward, with the same output."""
        t0 = time.perf_counter()
        plan = prompt if isinstance(prompt, PromptPlan) else self.plan(prompt)
        self.check_length(plan)
        method = self.method(reuse)
        comp = Compression.parse(kv_bits, evict, kv_alloc)
        spec = self.speculation(speculate)
        return Generation(self._generate(plan, method, comp, params or SamplingParams(), t0, spec))

    def generate(
        self, prompt: list[Segment] | PromptPlan, params: SamplingParams | None = None, reuse=None, **options
    ) -> GenerationResult:
        """:meth:`stream` to the end; ``options``: its ``kv_bits``, ``evict``, ``kv_alloc`` and ``speculate``."""
        gen = self.stream(prompt, params, reuse, **options)
        for _ in gen:
            pass
        assert gen.result is not None
        return gen.result

    def generate_many(
        self,
        prompts: list[list[Segment] | PromptPlan],
        params: SamplingParams | list[SamplingParams] | None = None,
        reuse=None,
        *,
        batch: BatchConfig | None = None,
        speculate: str | SpecConfig | None = None,
        **compression,
    ) -> list[GenerationResult]:
        """Answer many prompts together, with continuous batching (like vLLM's ``LLM.generate(list)``); results
        in the prompts' order. ``params``: one for every prompt, or one per prompt. ``batch``: batch size, tokens
        per step, KV budget. Greedy answers equal :meth:`generate`'s one by one. Raises the first request's
        error, if any failed; ValueError before any compute for bad input."""
        plans = [p if isinstance(p, PromptPlan) else self.plan(p) for p in prompts]
        per = params if isinstance(params, list) else [params or SamplingParams()] * len(plans)
        if len(per) != len(plans):
            raise ValueError(f"got {len(per)} sampling params for {len(plans)} prompts; pass one, or one per prompt")
        for plan in plans:
            self.check_length(plan)
        method, comp, spec = self.method(reuse), Compression.parse(**compression), self.speculation(speculate)
        scheduler = Scheduler(self, batch)
        seqs = [scheduler.add(plan, p, method, comp, speculate=spec) for plan, p in zip(plans, per, strict=True)]
        scheduler.run_until_done()
        failed = next((s.error for s in seqs if s.error is not None), None)
        if failed is not None:
            raise failed
        return [s.result for s in seqs]

    def decode(self, pre: Prefilled, params: SamplingParams | None = None, speculate=None) -> GenerationResult:
        """Generate the answer after a prefill (from :meth:`prefill`). Extends ``pre.cache``; clone it first
        (``replace(pre, cache=pre.cache.clone())``) to keep the prompt's cache for something else."""
        spec = self.speculation(speculate)
        gen = Generation(self._decode(pre, params or SamplingParams(), time.perf_counter(), spec))
        for _ in gen:
            pass
        assert gen.result is not None
        return gen.result

    def ask(self, question: str, documents: list[str] = (), system: str | None = None, **kw) -> GenerationResult:
        """Convenience: one question over plain-text documents."""
        reuse = kw.pop("reuse", None)
        segs = ([Segment(system, "system")] if system else []) + [Segment(d) for d in documents]
        return self.generate([*segs, Segment(question, "user")], SamplingParams(**kw), reuse)

    def _generate(self, plan, method, comp, params, t0, spec) -> Generator[str, None, GenerationResult]:
        pre = self._prefill(plan, method, comp)
        return (yield from self._decode(pre, params, t0, spec))

    def speculation(self, speculate: str | SpecConfig | None = None) -> SpecConfig | None:
        """The speculative decoding a call asks for (None: this engine's default); None when off."""
        return SpecConfig.parse(self.config.speculate if speculate is None else speculate)

    def decoding(self, params: SamplingParams, prompt_tokens: int) -> Decoding:
        """A fresh decoding state for one sequence of this engine (its EOS ids and context limit)."""
        return Decoding(self.tokenizer, self.eos_ids, params, prompt_tokens, self.lm.context_limit)

    def _decode(self, pre: Prefilled, params: SamplingParams, t0: float, spec: SpecConfig | None = None):
        """Sample the first token from ``pre``, then decode (one token per forward, or several with speculation)
        until EOS, a stop string, ``max_tokens`` or the context limit. Yields text deltas; returns the result."""
        kv_bytes = pre.cache.nbytes
        dec = self.decoding(params, pre.report.prompt_tokens)
        delta = dec.step(pre.last_logits)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        stepper = Stepper(dec, pre, spec)
        while True:
            if delta:
                yield delta
            if dec.finished:
                break
            (h,) = self.runner.run([stepper.rows()])
            delta = stepper.take(self.runner.logits(h if stepper.all_rows else h[-1:]))
        result = dec.result(pre.report, ttft, time.perf_counter() - t1, kv_bytes)
        result.speculation = stepper.stats
        return result
