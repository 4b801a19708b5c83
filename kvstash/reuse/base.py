"""Reuse methods: how a prompt's KV is built from what the chunk store has.

Each method overrides one ``prefill``; the shared steps (the exact prefix, the chunk layout) live in
:mod:`kvstash.reuse.prefix` and :mod:`kvstash.reuse.layout`. The methods are named in
:mod:`kvstash.reuse.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvstash.cache.kv import KVCache
from kvstash.model.runner import LayerHook, Runner, Steps
from kvstash.prompt import PromptPlan
from kvstash.reuse.report import PrefillReport
from kvstash.reuse.source import ChunkSource


@dataclass
class Prefilled:
    """A prompt's cache after prefill and what it took."""

    cache: KVCache
    last_logits: torch.Tensor  # [vocab] float32: the distribution of the first generated token
    report: PrefillReport
    decode_hook: LayerHook | None = None  # runs in every decoding forward (eviction while decoding, ``:decode``)
    prompt_ids: tuple[int, ...] = ()  # the prompt's token ids (what a speculative drafter looks things up in)


class ReuseMethod(ABC):
    """Builds the KV cache for a whole prompt plan."""

    name: ClassVar[str]
    needs_store: ClassVar[bool] = True  # False: computes everything, never reads the chunk store

    def __init__(self, prefill_chunk: int = 512):
        self.prefill_chunk = prefill_chunk  # query tokens per forward when tokens are computed in full

    def prefill(self, runner: Runner, plan: PromptPlan, chunks: ChunkSource | None = None) -> Prefilled:
        """Return a cache holding every prompt token and the logits after the last one.

        ``chunks`` is the engine's chunk source (None when the engine has none and ``needs_store`` is False).
        Raises ValueError when the method needs a store and gets none.
        """
        return runner.drive(self.prefill_steps(runner, plan, chunks))

    @abstractmethod
    def prefill_steps(self, runner: Runner, plan: PromptPlan, chunks: ChunkSource | None) -> Steps[Prefilled]:
        """:meth:`prefill` as steps: the model passes it needs, one at a time (see
        :data:`kvstash.model.runner.Steps`), so a scheduler can batch them with other sequences' work."""

    def source(self, chunks: ChunkSource | None) -> ChunkSource:
        if chunks is None:
            raise ValueError(f"reuse method {self.name!r} needs a chunk store; open the engine with a store")
        return chunks
