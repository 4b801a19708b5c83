"""One request in the scheduler: what was asked, where it stands, and what it produced."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstash.compress.pipeline import Compression
from kvstash.decoding import Decoding, GenerationResult
from kvstash.model.runner import Rows, Steps
from kvstash.prompt import PromptPlan
from kvstash.reuse.base import Prefilled, ReuseMethod
from kvstash.sampling import SamplingParams
from kvstash.speculate.speculation import SpecConfig, Stepper

_ids = itertools.count(1)


class State(enum.Enum):
    WAITING = "waiting"  # not admitted yet (batch full or KV budget), or preempted
    PREFILL = "prefill"  # building its prompt's KV, one pass per step
    DECODE = "decode"  # one token per step
    DONE = "done"  # finished, failed or cancelled


@dataclass
class Sequence:
    """A prompt being answered. The scheduler owns every field; callers read ``result`` / ``error`` once
    ``state`` is DONE, and get text deltas through ``on_delta`` as they come."""

    plan: PromptPlan
    params: SamplingParams
    method: ReuseMethod
    compression: Compression
    on_delta: Callable[[Sequence, str], None] | None = None  # called on the scheduler's thread
    on_done: Callable[[Sequence], None] | None = None  # called once, when the sequence ends in any way
    tag: Any = None  # the caller's own handle (a server job)
    speculate: SpecConfig | None = None  # speculative decoding (None: off)
    id: int = field(default_factory=lambda: next(_ids))
    state: State = State.WAITING
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # when it was first admitted (queue time = admitted - arrived)
    first_token_at: float | None = None
    finished_at: float | None = None
    steps: Steps[Prefilled] | None = None  # the prefill's passes while PREFILL
    pending: list[Rows] | None = None  # the pass it waits to run
    layer: int = 0  # the pending pass's next layer (a pass may run a few layers per step)
    end: int = 0  # the layer the pending pass ends at (exclusive): the model's last unless the pass says less
    pre: Prefilled | None = None  # the prompt's cache once prefilled
    dec: Decoding | None = None
    stepper: Stepper | None = None  # its decoding steps over its current cache
    kv_bytes: int = 0  # the prompt's decode cache bytes after compression (as GenerationResult.kv_bytes)
    result: GenerationResult | None = None
    error: BaseException | None = None
    cancelled: bool = False
    preemptions: int = 0
    swapped: tuple[Path, Prefilled] | None = None  # preempted with its KV in a swap file: (file, the rest)

    @property
    def prompt_tokens(self) -> int:
        return len(self.plan)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived

    def pending_tokens(self) -> int:
        return sum(len(rows.positions) for rows in self.pending or ())
