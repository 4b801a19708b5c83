"""Engine: load a model, take segments, build the prompt's KV with a reuse method, and decode."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from kvstash.chunks import DEFAULT_STORE, ChunkSource
from kvstash.compress import Compression
from kvstash.detok import TextStream
from kvstash.forward import Runner
from kvstash.models import DEFAULT_MODEL, LoadedModel, load_model
from kvstash.prompt import PromptBuilder, PromptPlan, Segment
from kvstash.reuse import Prefilled, PrefillReport, ReuseMethod, make_method
from kvstash.sampling import SamplingParams, sample


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL  # registry name or local HF model directory
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    threads: int | None = None  # torch CPU threads (None: torch's default)
    prefill_chunk: int = 512  # query tokens per forward during prefill (bounds attention memory)
    store: str = DEFAULT_STORE  # chunk store spec for the reuse methods, e.g. ram:4GiB,disk:DIR
    codec: str = "fp16"  # how chunk KV is encoded in the store

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens or the context limit)
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    ttft_s: float  # request start -> first token chosen (planning, loading, prefill, first sample)
    prefill_tok_s: float  # prompt tokens computed per second of compute during prefill
    decode_s: float
    decode_tok_s: float  # tokens per second after the first one
    prefill: PrefillReport = field(repr=False)
    kv_bytes: int = 0  # K/V bytes of the prompt's decode cache after eviction / quantization (--evict, --kv-bits)

    def summary(self) -> dict:
        """The flat JSON view used by the CLI and the benchmarks."""
        r = self.prefill
        return {
            "answer": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": round(self.ttft_s, 4),
            "prefill_tok_s": round(self.prefill_tok_s, 1),
            "decode_tok_s": round(self.decode_tok_s, 1),
            "reuse": r.method,
            "reused_tokens": r.reused_tokens,
            "recomputed_tokens": r.recomputed_tokens,
            "computed_tokens": r.recomputed_tokens,
            "load_s": round(r.load_s, 4),
            "recompute_s": round(r.compute_s, 4),
            "store_s": round(r.store_s, 4),
            "tier_hits": dict(r.tier_hits),
            "kv_bytes": self.kv_bytes,
            **({"kv_head_bits": r.kv_head_bits} if r.kv_head_bits else {}),
        }


class Generation:
    """A streaming generation: iterate for text deltas; ``result`` is set once iteration ends."""

    def __init__(self, it: Iterator[str]):
        self._it = it
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self._it


class Engine:
    """Loads a model once and answers prompts given as segments."""

    def __init__(self, config: EngineConfig | None = None, *, loaded: LoadedModel | None = None, **overrides):
        self.config = config or EngineConfig(**overrides)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.lm = loaded or load_model(self.config.model, getattr(torch, self.config.dtype))
        self.runner = Runner(self.lm.model)
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

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.lm.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids |= set(extra) if isinstance(extra, list) else {extra}
        return {i for i in ids if i is not None}

    def plan(self, segments: list[Segment]) -> PromptPlan:
        if not isinstance(segments, list | tuple) or not all(isinstance(s, Segment) for s in segments):
            raise TypeError("segments must be a list of kvstash.Segment")
        return self.builder.build(list(segments))

    def method(self, reuse: str | ReuseMethod | None, **opts) -> ReuseMethod:
        """A reuse method from a name (``full``, ``prefix``, ``naive``, ``blend``, ``blend:0.3``) or as given."""
        if isinstance(reuse, ReuseMethod):
            return reuse
        return make_method(reuse or "full", self.config.prefill_chunk, **opts)

    def _source(self, method: ReuseMethod) -> ChunkSource | None:
        return None if method.name == "full" else self.chunks

    def check_length(self, plan: PromptPlan) -> None:
        limit = self.lm.context_limit
        if len(plan) + 1 > limit:
            raise ValueError(
                f"prompt is {len(plan)} tokens but {self.lm.name} takes at most {limit} "
                f"(prompt + at least 1 generated token); shorten the documents or pass fewer"
            )

    def prefill(
        self, plan: PromptPlan, reuse: str | ReuseMethod | None = None, *, kv_bits=None, evict=None, kv_alloc=None
    ) -> Prefilled:
        """The prompt's cache and first-token logits; ``evict`` / ``kv_bits`` compress the cache afterwards
        (eviction while decoding, ``:decode``, applies only in :meth:`stream`)."""
        self.check_length(plan)
        comp = Compression.parse(kv_bits, evict, kv_alloc)
        method = self.method(reuse)
        pre = method.prefill(self.runner, plan, self._source(method))
        comp.apply(self.runner, pre, plan.token_ids)
        return pre

    @torch.inference_mode()
    def teacher_forced_logits(self, pre: Prefilled, answer_ids: list[int]) -> torch.Tensor:
        """Next-token logits along a given answer after a prefill: row i is the distribution of answer token i
        given the prompt and answer[:i]. Returns [len(answer_ids), vocab]. Extends ``pre.cache``."""
        if not answer_ids:
            return pre.last_logits[None]
        pos = pre.cache.next_position()
        ids = torch.tensor(answer_ids[:-1], dtype=torch.long)
        rest = self.runner.forward(ids, torch.arange(pos, pos + len(ids)), pre.cache, all_logits=True)
        return torch.cat([pre.last_logits[None], rest]) if len(ids) else pre.last_logits[None]

    def stream(
        self,
        segments: list[Segment],
        params: SamplingParams | None = None,
        reuse=None,
        *,
        kv_bits=None,
        evict=None,
        kv_alloc=None,
    ) -> Generation:
        """Start generating; iterate the returned Generation for text deltas. Errors in input raise here.

        ``evict`` (``"snapkv:0.25"``, an EvictionPolicy) and ``kv_bits`` (2, 4, 8, 16) compress the prompt's
        cache after prefill: evict first, then quantize; ``kv_alloc="mixed"`` (with ``kv_bits=4``) gives each
        KV head's keys and values 2, 4 or 8 bits by measured sensitivity, for uniform 4-bit's bytes."""
        params = params or SamplingParams()
        t0 = time.perf_counter()
        plan = self.plan(segments)
        self.check_length(plan)
        method = self.method(reuse)
        comp = Compression.parse(kv_bits, evict, kv_alloc)
        gen = Generation(iter(()))
        gen._it = self._decode(gen, plan, method, params, t0, comp)
        return gen

    def generate(
        self, segments: list[Segment], params: SamplingParams | None = None, reuse=None, **compression
    ) -> GenerationResult:
        """:meth:`stream` to the end; ``compression``: its ``kv_bits``, ``evict`` and ``kv_alloc``."""
        gen = self.stream(segments, params, reuse, **compression)
        for _ in gen:
            pass
        assert gen.result is not None
        return gen.result

    def ask(self, question: str, documents: list[str] = (), system: str | None = None, **kw) -> GenerationResult:
        """Convenience: one question over plain-text documents."""
        reuse = kw.pop("reuse", None)
        segs = ([Segment(system, "system")] if system else []) + [Segment(d) for d in documents]
        return self.generate([*segs, Segment(question, "user")], SamplingParams(**kw), reuse)

    @torch.inference_mode()
    def _decode(
        self,
        gen: Generation,
        plan: PromptPlan,
        method: ReuseMethod,
        params: SamplingParams,
        t0: float,
        comp: Compression,
    ):
        pre = method.prefill(self.runner, plan, self._source(method))
        evictor = comp.apply(self.runner, pre, plan.token_ids)
        cache, logits, kv_bytes = pre.cache, pre.last_logits, pre.cache.nbytes
        rng = params.generator()
        text = TextStream(self.tokenizer, params.stop)
        limit = self.lm.context_limit
        pos = len(plan)
        token = sample(logits, params, rng)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        finish = "length"
        while True:
            if token in self.eos_ids:
                finish = "stop"
                break
            delta = text.push(token)
            if delta:
                yield delta
            if text.stopped:
                finish = "stop"
                break
            if len(text.ids) >= params.max_tokens or pos + 1 >= limit:
                break
            observer = evictor.observe if evictor else None
            logits = self.runner.forward(torch.tensor([token]), torch.tensor([pos]), cache, observer=observer)
            if evictor:
                evictor.step(cache)
            pos += 1
            token = sample(logits, params, rng)
        tail = text.flush()
        if tail:
            yield tail
        decode_s = time.perf_counter() - t1
        n = len(text.ids)
        computed = pre.report.recomputed_tokens
        gen.result = GenerationResult(
            text=text.text,
            finish_reason=finish,
            prompt_tokens=len(plan),
            completion_tokens=n,
            token_ids=list(text.ids),
            ttft_s=ttft,
            prefill_tok_s=computed / pre.report.compute_s if pre.report.compute_s > 0 else 0.0,
            decode_s=decode_s,
            decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            prefill=pre.report,
            kv_bytes=kv_bytes,
        )
