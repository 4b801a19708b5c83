"""Peer baselines measured in the same run: what a user would otherwise run with plain transformers.

- ``hf``: ``model.generate`` on the same prompt ids, greedy, no cache reuse.
- ``hf-prefix``: the shared head of the prompt (template glue and system prompt, the tokens before the first
  document) prefilled once into a ``DynamicCache``; each request deep-copies it and ``generate`` computes
  only the rest. This is transformers' own prefix caching; it cannot reuse documents out of prefix position.

TTFT is taken by a streamer: ``generate`` hands it the prompt first, then each new token; the time of the
first new token is the TTFT.
"""

from __future__ import annotations

import copy
import time
from typing import NamedTuple

import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from kvstash.prompt import PromptPlan


class Measured(NamedTuple):
    """One method's answer to one prompt, with what it cost."""

    token_ids: list[int]  # greedy answer ids (EOS excluded)
    text: str
    ttft_s: float
    logits: torch.Tensor  # [T, vocab]: next-token logits teacher-forced along the reference answer
    recomputed_tokens: int  # prompt tokens computed in this request
    reused_tokens: int  # prompt tokens whose KV came from a cache
    kv_bytes: int  # bytes of the prompt's KV as the method holds it
    decode_tok_s: float = 0.0  # answer tokens per second after the first
    tokens_per_forward: float | None = None  # answer tokens after the first per decoding pass (1 without drafts)
    gen_s: float | None = None  # this request's share of the wall time of the generation it ran in


class _FirstTokenTimer(BaseStreamer):
    """Records when generate emits its first new token (its second ``put``; the first is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def _head_length(plan: PromptPlan) -> int:
    """Tokens before the first document (or the question): the head every prompt of a run shares."""
    return next(s.start for s in plan.segments if s.kind in ("document", "user"))


def _cache_bytes(cache, tokens: int) -> int:
    """Bytes a DynamicCache spends on ``tokens`` tokens (it also holds the generated ones)."""
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total * tokens // max(1, cache.get_seq_length())


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class HFGenerate:
    """transformers ``generate`` on the prompt ids, greedy; with ``reuse_head`` the prompt head's cache
    is computed once per distinct head and copied into every request."""

    def __init__(
        self, model, tokenizer, eos_ids: set[int], max_tokens: int, reuse_head: bool = False, lookup: bool = False
    ):
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = sorted(eos_ids)
        self.max_tokens = max_tokens
        self.reuse_head = reuse_head
        self.lookup = lookup  # prompt-lookup decoding (drafts of up to 10 tokens copied from the prompt)
        self._heads: dict[tuple[int, ...], DynamicCache] = {}  # head ids -> its prefilled cache

    @torch.inference_mode()
    def head_cache(self, head: tuple[int, ...]) -> DynamicCache:
        """The prefilled cache of ``head``, computed on first use (untimed: it is shared by all requests)."""
        if head not in self._heads:
            cache = DynamicCache(config=self.model.config)
            self.model(torch.tensor([head]), past_key_values=cache, use_cache=True)
            self._heads[head] = cache
        return self._heads[head]

    @torch.inference_mode()
    def run(self, plan: PromptPlan, reference_ids: list[int]) -> Measured:
        """Generate for ``plan``. ``logits`` covers the positions where this answer still followed
        ``reference_ids`` (there they are teacher-forced along it; all positions when the answers agree)."""
        ids = torch.tensor([plan.token_ids])
        n_head = _head_length(plan) if self.reuse_head else 0
        head = self.head_cache(tuple(plan.token_ids[:n_head])) if n_head else None
        timer = _FirstTokenTimer()
        t0 = time.perf_counter()
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=copy.deepcopy(head) if head is not None else None,
            max_new_tokens=self.max_tokens,
            do_sample=False,
            eos_token_id=self.eos_ids,
            pad_token_id=self.eos_ids[0],
            streamer=timer,
            return_dict_in_generate=True,
            output_logits=True,
            **({"prompt_lookup_num_tokens": 10} if self.lookup else {}),
        )
        end = time.perf_counter()
        ttft = (timer.first_token_at or end) - t0
        new = out.sequences[0, ids.shape[1] :].tolist()
        answer = new[: next((i for i, t in enumerate(new) if t in self.eos_ids), len(new))]
        logits = torch.cat(out.logits).float()  # [steps, vocab]
        valid = min(_common_prefix(answer, reference_ids) + 1, len(logits), max(1, len(reference_ids)))
        return Measured(
            token_ids=answer,
            text=self.tokenizer.decode(answer, skip_special_tokens=True),
            ttft_s=ttft,
            logits=logits[:valid],
            recomputed_tokens=len(plan) - n_head,
            reused_tokens=n_head,
            kv_bytes=_cache_bytes(out.past_key_values, len(plan)),
            decode_tok_s=(len(answer) - 1) / (end - t0 - ttft) if len(answer) > 1 and end - t0 > ttft else 0.0,
        )
