"""Continuous batching: many sequences share each pass through the model.

The shape of nano-vllm's and vLLM v1's schedulers: a waiting queue and a running list, and one :meth:`step`
that runs one pass of the runner's layer loop over

- the next token of every decoding sequence (one row each), and
- the next prefill pass of prefilling sequences, first come first served, while the step's rows stay within
  ``max_batch_tokens``: a plain prefill comes in chunks of ``prefill_chunk`` tokens, and a pass larger than
  what is left of the budget (blend's pass over a whole prompt, a chunk over the budget) runs a few layers per
  step, its rows' hidden states carried to the next step, so a long prompt never stalls the others' decoding
  for long. A token through every layer counts one against the budget, through a third of them a third, and
  one that attends over n cached keys ``1 + n / keys_per_row`` (3072 for SmolLM2: past that many keys its
  attention costs more than its linear layers), so a step's time stays near the budget's whatever the context.

A prompt's KV is built by its own reuse method (``full``, ``prefix``, ``naive``, ``blend``), whose passes are
steps (:data:`kvstash.model.runner.Steps`) run inside the batch; then the sequence decodes with the others.

Memory: a sequence is admitted only while the KV bytes of all running sequences, plus its prompt's, stay
within ``kv_budget``; when decoding sequences outgrow it, the newest is preempted: its KV is swapped out to a
file and read back when it is admitted again (:mod:`kvstash.batch.swap`; 0.05 s against 1.1 s to recompute a
4.3K-token sequence with blend, ``benchmarks/preempt.py``), or, where it cannot be swapped (``swap=False``, a
quantized or evicted cache, a failed write or read), dropped and recomputed: its prompt through the reuse
method, its generated tokens in one plain pass. A request whose prompt and answer could never fit is refused
when it is added, before any compute.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import torch

from kvstash.batch.budget import default_kv_budget
from kvstash.batch.sequence import Sequence, State
from kvstash.batch.swap import SwapSpace
from kvstash.compress.pipeline import Compression
from kvstash.decoding import Decoding
from kvstash.model.runner import Rows, Runner, Steps
from kvstash.prompt import PromptPlan
from kvstash.reuse.base import Prefilled, ReuseMethod
from kvstash.reuse.source import ChunkSource
from kvstash.sampling import SamplingParams
from kvstash.speculate.speculation import SpecConfig, Stepper

ADMIT_ROOM = 64  # free slots a sequence is admitted with beyond its tokens (its first answer tokens)


class EngineParts(Protocol):
    """What the scheduler uses of an engine (:class:`kvstash.Engine` has all of it)."""

    runner: Runner

    @property
    def chunks(self) -> ChunkSource: ...

    def decoding(self, params: SamplingParams, prompt_tokens: int) -> Decoding: ...


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 16  # sequences admitted at once (prefilling or decoding)
    max_batch_tokens: int = 512  # rows per step (a row over many keys counting more: Runner.row_cost); a prefill
    # pass larger than what is left runs a few layers per step
    kv_budget: int | None = None  # bytes of KV all running sequences may hold; None: a quarter of the RAM
    swap: bool = True  # preempted sequences' KV to a file and back (else dropped and recomputed)
    swap_dir: str | None = None  # where swapped KV goes; None: a private temporary directory

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.kv_budget is not None and self.kv_budget <= 0:
            raise ValueError(f"kv_budget must be a positive number of bytes, got {self.kv_budget}")


class StepStats(NamedTuple):
    decoding: int  # sequences that decoded a token in this step
    prefill_tokens: int  # prompt rows computed in this step
    seconds: float  # the step's wall time
    preempted: int  # sequences preempted before it
    prefill_work: float = 0.0  # what the prefill passes counted against the budget (Runner.row_cost x share of
    # the layers run)


class Scheduler:
    """Runs sequences to completion in batches; single-threaded (the server calls it from one thread)."""

    def __init__(self, engine: EngineParts, config: BatchConfig | None = None):
        self.engine = engine
        self.runner = engine.runner
        self.config = config or BatchConfig()
        self.kv_budget = self.config.kv_budget or default_kv_budget()
        self.slot_bytes = self.runner.new_cache(1).bytes_per_slot()  # dense KV of one token, every layer
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: prefilling and decoding
        self.preemptions = 0
        self.swap = SwapSpace(self.config.swap_dir) if self.config.swap else None

    # --- requests ----------------------------------------------------------------------------------------
    def add(
        self,
        plan: PromptPlan,
        params: SamplingParams,
        method: ReuseMethod,
        compression: Compression | None = None,
        *,
        on_delta: Callable[[Sequence, str], None] | None = None,
        on_done: Callable[[Sequence], None] | None = None,
        tag=None,
        speculate: SpecConfig | None = None,
    ) -> Sequence:
        """Queue a prompt (planned, length-checked). ValueError, before any compute, if its prompt and answer
        could never fit in the KV budget even alone."""
        need = (len(plan) + params.max_tokens + 1) * self.slot_bytes
        if need > self.kv_budget:
            raise ValueError(
                f"this request needs about {need / 2**20:.0f} MiB of KV cache ({len(plan)} prompt tokens + "
                f"max_tokens {params.max_tokens}), more than the whole KV budget of {self.kv_budget / 2**20:.0f} "
                "MiB; lower max_tokens, shorten the prompt, or raise --kv-budget"
            )
        seq = Sequence(plan, params, method, compression or Compression(), on_delta, on_done, tag, speculate)
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` at the next step boundary (its ``on_done`` runs then). Safe from the scheduler's thread."""
        seq.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_bytes(self) -> int:
        """KV bytes the running sequences hold now (prefilling ones: what their prompt will take)."""
        return sum(self._held(s) for s in self.running)

    # --- one step ------------------------------------------------------------------------------------------
    def step(self) -> StepStats:
        """Admit what fits, run one batched pass, hand each sequence its part. Returns what the step did."""
        t0 = time.perf_counter()
        self._reap()
        preempted = self._make_room()
        self._admit()
        batch, decoding, prefilling, work = self._plan()
        hs = self.runner.run(batch) if batch else []
        self._advance_decoding(decoding, hs[: len(decoding)])
        self._advance_prefill(prefilling, hs[len(decoding) :])
        prefill_tokens = sum(len(r.positions) for r in batch[len(decoding) :])
        return StepStats(len(decoding), prefill_tokens, time.perf_counter() - t0, preempted, work)

    def run_until_done(self) -> None:
        while self.has_work:
            self.step()

    def _plan(self) -> tuple[list[Rows], list[Sequence], list[Sequence], float]:
        """The rows of this step: every decoding sequence's token, then prefill passes in admission order, each
        whole or the layers of it that fit the step's token budget (:meth:`_layers`). Costs are in rows through
        every layer, a row's attention counted by the keys it reads (:meth:`Runner.row_cost`)."""
        decoding = [s for s in self.running if s.state is State.DECODE]
        batch = [s.stepper.rows(len(decoding)) for s in decoding]  # a draft tree brings several rows
        decode_cost = sum(self.runner.row_cost(r) for r in batch)
        spent, prefilling = decode_cost, []
        for seq in self.running:
            if seq.state is not State.PREFILL:
                continue
            per_layer = sum(self.runner.row_cost(r) for r in seq.pending) / self.runner.num_layers
            layers = self._layers(seq, per_layer, self.config.max_batch_tokens - spent, first=not prefilling)
            if not layers:
                break  # first come, first served: later prompts wait for the earlier ones
            for rows in seq.pending:
                rows.first, rows.last = seq.layer, seq.layer + layers
            batch += seq.pending
            prefilling.append(seq)
            spent += per_layer * layers
        return batch, decoding, prefilling, spent - decode_cost

    def _layers(self, seq: Sequence, per_layer: float, left: float, first: bool) -> int:
        """How many layers of ``seq``'s pending pass (costing ``per_layer`` a layer) run in this step, within
        ``left`` of the budget: the rest of the pass if it fits, else the layers that fit (chunked prefill by
        layers: a blend pass over thousands of tokens, or a plain chunk over the budget, runs a few layers per
        step while the others decode). The first prefill of a step may use the whole budget, and always gets a
        layer."""
        remaining = seq.end - seq.layer
        room = left if not first else max(left, self.config.max_batch_tokens)
        if per_layer * remaining <= room:
            return remaining
        return min(remaining, max(int(first), int(room // per_layer)))

    def _advance_decoding(self, seqs: list[Sequence], hs: list[torch.Tensor]) -> None:
        if not seqs:
            return
        parts = [h if s.stepper.all_rows else h[-1:] for s, h in zip(seqs, hs, strict=True)]
        logits = self.runner.logits(torch.cat(parts))  # one LM head for the whole batch
        for seq, rows in zip(seqs, logits.split([len(p) for p in parts]), strict=True):
            self._emit(seq, seq.stepper.take(rows))

    def _advance_prefill(self, seqs: list[Sequence], hs: list[torch.Tensor]) -> None:
        at = 0
        for seq in seqs:
            n, end = len(seq.pending), seq.pending[0].last if seq.pending else seq.end
            out, at = hs[at : at + n], at + n
            if end < seq.end:  # the pass goes on from layer ``end`` in a later step
                for rows, h in zip(seq.pending, out, strict=True):
                    rows.h = h
                seq.layer = end
                continue
            try:
                self._next_pass(seq, seq.steps.send(out))
            except StopIteration as done:
                self._prefilled(seq, done.value)
            except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
                self._finish(seq, error=e)

    # --- admission, memory, preemption ---------------------------------------------------------------------
    def _held(self, seq: Sequence) -> int:
        if seq.pre is not None:
            return seq.pre.cache.reserved_nbytes
        return (seq.prompt_tokens + ADMIT_ROOM) * self.slot_bytes  # what its prefill will allocate

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            if self.running and self.kv_bytes() + self._held_after_admit(seq) > self.kv_budget:
                break
            self.waiting.popleft()
            self._start(seq)

    def _held_after_admit(self, seq: Sequence) -> int:
        fed = 0 if seq.dec is None else len(seq.dec.token_ids)
        return (seq.prompt_tokens + fed + ADMIT_ROOM) * self.slot_bytes

    def _start(self, seq: Sequence) -> None:
        seq.admitted = seq.admitted or time.perf_counter()
        if seq.swapped is not None and self._swap_in(seq):
            return
        seq.state, seq.pre, seq.layer = State.PREFILL, None, 0
        seq.steps = self._prefill_steps(seq)
        self.running.append(seq)
        try:
            self._next_pass(seq, next(seq.steps))
        except StopIteration as done:
            self._prefilled(seq, done.value)
        except Exception as e:  # noqa: BLE001 - reported to this request only
            self._finish(seq, error=e)

    def _next_pass(self, seq: Sequence, pending: list[Rows]) -> None:
        """The prompt's next pass: it runs layers [first, last) of its rows (the model's every layer unless the
        method asked for fewer, e.g. blend's first layers in chunks of tokens), cut by :meth:`_plan`."""
        head = pending[0] if pending else None
        seq.pending, seq.layer = pending, head.first if head is not None else 0
        seq.end = head.last if head is not None and head.last is not None else self.runner.num_layers

    def _prefill_steps(self, seq: Sequence) -> Steps[Prefilled]:
        """The prompt's KV by its reuse method, compressed; after a preemption also the tokens it had fed."""
        chunks = self.engine.chunks if seq.method.needs_store else None
        pre = yield from seq.method.prefill_steps(self.runner, seq.plan, chunks)
        cache, hook, head_bits = seq.compression.apply(self.runner, pre.cache, seq.plan.token_ids)
        pre.report.kv_head_bits = head_bits
        pre = replace(pre, cache=cache, decode_hook=hook, prompt_ids=seq.plan.token_ids)
        seq.kv_bytes = cache.nbytes
        fed = seq.dec.token_ids[:-1] if seq.dec is not None else []
        if fed:  # resuming after a preemption: its answer so far, in one plain pass
            chunk = seq.method.prefill_chunk
            yield from self.runner.prefill_steps(pre.cache, fed, seq.prompt_tokens, chunk)
        return pre

    def _make_room(self) -> int:
        """Before a step: caches about to fill get their next slots now (a quarter more, at most what the
        answer can still use); while that would exceed the budget, the newest decoding sequence is preempted."""
        n = 0
        while True:
            decoding = [s for s in self.running if s.state is State.DECODE]
            growth = {s.id: self._growth(s) for s in decoding}
            if len(decoding) <= 1 or self.kv_bytes() + sum(growth.values()) * self.slot_bytes <= self.kv_budget:
                break
            self._preempt(decoding[-1])
            n += 1
        for seq in decoding:
            if growth[seq.id]:
                seq.pre.cache.reserve(growth[seq.id])
        return n

    def _growth(self, seq: Sequence) -> int:
        """Slots ``seq``'s cache must gain before its next token: none while it has room."""
        cache = seq.pre.cache
        rows = 1 + (seq.speculate.nodes if seq.stepper.all_rows else 0)  # a draft's rows are appended too
        if cache.length + rows <= cache.capacity:
            return 0
        left = seq.params.max_tokens - len(seq.dec.token_ids) + rows
        return min(max(256, cache.capacity // 4), max(rows, left))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if self.swap is not None and seq.pre.decode_hook is None and self.swap.can_swap(seq.pre.cache):
            path = self.swap.save(f"seq-{seq.id}", seq.pre.cache)
            seq.swapped = None if path is None else (path, replace(seq.pre, cache=None))
        seq.state, seq.pre, seq.steps, seq.pending, seq.stepper = State.WAITING, None, None, None, None
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _swap_in(self, seq: Sequence) -> bool:
        """Resume a swapped-out sequence from its file, decoding where it stopped; False if the file did not
        read back (the caller recomputes instead)."""
        (path, pre), seq.swapped = seq.swapped, None
        cache = self.swap.load(path, self.runner, room=ADMIT_ROOM)  # the room admission counted it for
        if cache is None:
            return False
        seq.pre, seq.state = replace(pre, cache=cache), State.DECODE
        seq.stepper = Stepper(seq.dec, seq.pre, seq.speculate)
        self.running.append(seq)
        return True

    # --- results ---------------------------------------------------------------------------------------------
    def _prefilled(self, seq: Sequence, pre: Prefilled) -> None:
        seq.pre, seq.steps, seq.pending = pre, None, None
        seq.state = State.DECODE
        if seq.dec is None:  # first time: the first token comes from the prompt's last logits
            seq.dec = self.engine.decoding(seq.params, seq.prompt_tokens)
            delta = seq.dec.step(pre.last_logits)
            seq.first_token_at = time.perf_counter()
            seq.stepper = Stepper(seq.dec, pre, seq.speculate)
            self._emit(seq, delta)
        else:  # resumed after a preemption: the same decoding, over the recomputed cache
            seq.stepper = Stepper(seq.dec, pre, seq.speculate)

    def _emit(self, seq: Sequence, delta: str) -> None:
        if delta and seq.on_delta is not None and not seq.cancelled:
            seq.on_delta(seq, delta)
        if seq.dec.finished:
            self._finish(seq)

    def _reap(self) -> None:
        for seq in [s for s in self.running if s.cancelled]:
            self._finish(seq)
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq)

    def _finish(self, seq: Sequence, error: BaseException | None = None) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.steps is not None:
            seq.steps.close()
        seq.state, seq.error, seq.finished_at = State.DONE, error, time.perf_counter()
        if error is None and not seq.cancelled and seq.dec is not None and seq.dec.finished:
            decode_s = seq.finished_at - (seq.first_token_at or seq.finished_at)
            seq.result = seq.dec.result(seq.pre.report, seq.ttft_s, decode_s, seq.kv_bytes)
            seq.result.speculation = seq.stepper.stats if seq.stepper is not None else None
        seq.pre, seq.steps, seq.pending = None, None, None  # the KV goes now
        if seq.swapped is not None:  # cancelled while swapped out
            SwapSpace.drop(seq.swapped[0])
            seq.swapped = None
        if seq.on_done is not None:
            seq.on_done(seq)
