"""Speculative decoding for one sequence: draft a token tree, verify it in one pass, keep what the model agrees
with (SpecInfer's tree verification, exact for greedy decoding and distribution-preserving when sampling).

One decoding step with speculation:

1. the drafter proposes a tree continuing the sequence (nothing: a plain one-token step);
2. one pass feeds the pending token and every node (:meth:`Speculation.rows`), each node attending to the
   cache, the pending token and its ancestors only (``Rows.tree``);
3. walking down from the pending token, the next token is chosen from each row's logits as plain decoding
   would (greedy argmax, or speculative sampling over the node's children); while it is one of the node's
   children, that child is accepted and the walk goes on from it (:meth:`Speculation.accept`);
4. the accepted rows' KV stays in the cache, the others are dropped (``KVCache.keep_tail``: no copy when the
   first branch was accepted); the token chosen last is the new pending token.

Adaptive: a sequence whose drafts keep being rejected drafts fewer nodes, and after a run of misses stops
drafting for a while (doubling up to ``max_cooldown`` steps), so chat without documents is not slowed down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvstash.cache.kv import KVCache
from kvstash.decoding import Decoding
from kvstash.model.runner import LayerHook, Rows
from kvstash.reuse.base import Prefilled
from kvstash.speculate.drafter import DRAFTERS, Drafter
from kvstash.speculate.tree import DraftTree

SPECULATE = ("off", "ngram")


@dataclass(frozen=True)
class SpecConfig:
    """How to speculate. ``method``: off | ngram."""

    method: str = "ngram"
    depth: int = 10  # most tokens along one branch
    nodes: int = 16  # most draft tokens verified in one pass
    max_n: int = 4  # longest n-gram looked up
    min_n: int = 2  # shortest
    misses: int = 3  # verifications in a row with nothing accepted before drafting pauses
    max_cooldown: int = 32  # longest pause, in steps
    # drafting pauses in a step where more sequences than this decode together: a big batch already shares each
    # weight read among its sequences, so draft rows would only add compute (vLLM disables speculation by
    # batch size for the same reason)
    max_batch: int = 4

    def __post_init__(self) -> None:
        if self.method not in SPECULATE:
            raise ValueError(f"speculate must be one of {', '.join(SPECULATE)}, got {self.method!r}")
        if not 1 <= self.depth <= 64 or not 1 <= self.nodes <= 64:
            raise ValueError(f"depth and nodes must be in 1..64, got {self.depth} and {self.nodes}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"ngram sizes must satisfy 1 <= min_n <= max_n, got {self.min_n} and {self.max_n}")

    @classmethod
    def parse(cls, value: str | SpecConfig | None) -> SpecConfig | None:
        """What a user passes (``"off"``, ``"ngram"``, a config, None) -> a config, or None for off."""
        config = value if isinstance(value, SpecConfig) else cls(value or "off")
        return None if config.method == "off" else config


@dataclass
class SpecStats:
    forwards: int = 0  # decoding passes that verified a draft
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens accepted (tokens gained over plain decoding)

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "drafted": self.drafted, "accepted": self.accepted}


@dataclass
class Speculation:
    """The speculation state of one sequence (see the module docstring)."""

    config: SpecConfig
    drafter: Drafter
    stats: SpecStats = field(default_factory=SpecStats)
    fed: int = 0  # answer tokens given to the drafter so far
    streak: int = 0  # verifications in a row that accepted nothing
    cooldown: int = 0  # steps left without drafting
    pause: int = 4  # the next cooldown's length
    rate: float = 3.0  # running mean of accepted tokens per verification (a hopeful start)

    @classmethod
    def start(cls, config: SpecConfig, prompt_ids) -> Speculation:
        drafter = DRAFTERS[config.method](max_n=config.max_n, min_n=config.min_n)
        drafter.extend(prompt_ids)
        return cls(config, drafter)

    def rows(
        self, dec: Decoding, cache: KVCache, hook: LayerHook | None = None, crowd: int = 1
    ) -> tuple[Rows, DraftTree]:
        """The next pass's rows for this sequence: its pending token and, if there is one, a draft tree (none
        when ``crowd``, the sequences decoding in this pass, is over ``config.max_batch``)."""
        self.drafter.extend(dec.token_ids[self.fed :])
        self.fed = len(dec.token_ids)
        tree = self._draft(dec, cache.tail_room) if crowd <= self.config.max_batch else DraftTree()
        depths = tree.depths()
        ids = torch.tensor([dec.token, *tree.tokens])
        positions = torch.tensor([dec.position, *(dec.position + d for d in depths)])
        return Rows(ids, positions, cache, hook=hook, tree=tree.visibility() if len(tree) else None), tree

    def _draft(self, dec: Decoding, room: int | None) -> DraftTree:
        if self.cooldown > 0:
            self.cooldown -= 1
            return DraftTree()
        left = dec.params.max_tokens - len(dec.token_ids)  # no point drafting past the answer's end
        depth = min(self.config.depth, left, dec.context_limit - dec.position - 2)
        nodes = min(self.config.nodes, max(4, round(2 * self.rate) + 4))
        if room is not None:  # a quantized cache can drop only what its fp16 residual holds
            nodes = min(nodes, room - 1)
        return self.drafter.propose(depth, nodes) if depth > 0 else DraftTree()

    @torch.inference_mode()  # the cache's tensors were made in inference mode
    def accept(self, dec: Decoding, cache: KVCache, start: int, logits: torch.Tensor, tree: DraftTree) -> str:
        """Choose the tokens from the pass's ``logits`` [T+1, vocab] (its rows start at cache slot ``start``), keep
        the accepted rows' KV, drop the rest. Returns the text the step adds."""
        node, kept, delta = -1, [start], ""
        while True:
            children = tree.children(node)
            token = dec.choose(logits[node + 1], list(children))
            delta += dec.push(token)
            if dec.finished or token not in children:
                break
            node = children[token]
            kept.append(start + node + 1)
        cache.keep_tail(start, kept)
        if len(tree):
            self._learn(len(tree), len(kept) - 1)
        return delta

    def _learn(self, drafted: int, accepted: int) -> None:
        s = self.stats
        s.forwards, s.drafted, s.accepted = s.forwards + 1, s.drafted + drafted, s.accepted + accepted
        self.rate = 0.7 * self.rate + 0.3 * accepted
        if accepted:
            self.streak, self.pause = 0, 4
            return
        self.streak += 1
        if self.streak >= self.config.misses:
            self.streak, self.cooldown = 0, self.pause
            self.pause = min(2 * self.pause, self.config.max_cooldown)


class Stepper:
    """One sequence's decoding steps, with or without speculation: the rows of its next pass (:meth:`rows`) and
    what to make of their logits (:meth:`take`). The engine runs one sequence's rows at a time; the scheduler
    runs many sequences' rows in one pass."""

    def __init__(self, dec: Decoding, pre: Prefilled, spec: SpecConfig | None):
        self.dec, self.cache, self.hook = dec, pre.cache, pre.decode_hook
        # eviction while decoding evicts after every pass, which would drop a draft's rows it must keep
        use = spec is not None and pre.decode_hook is None
        self.speculation = Speculation.start(spec, pre.prompt_ids) if use else None
        self._tree, self._start = DraftTree(), 0

    @property
    def all_rows(self) -> bool:
        """Whether :meth:`take` wants the logits of every row of the pass (else of the last one only)."""
        return self.speculation is not None

    def rows(self, crowd: int = 1) -> Rows:
        """The rows of this sequence's next pass; ``crowd``: how many sequences decode in that pass."""
        dec = self.dec
        self._start = self.cache.length
        if self.speculation is None:
            return Rows(torch.tensor([dec.token]), torch.tensor([dec.position]), self.cache, hook=self.hook)
        rows, self._tree = self.speculation.rows(dec, self.cache, self.hook, crowd)
        return rows

    def take(self, logits: torch.Tensor) -> str:
        """``logits`` [rows, vocab] of the pass :meth:`rows` asked for -> the text this step adds."""
        if self.speculation is None:
            return self.dec.step(logits[-1])
        return self.speculation.accept(self.dec, self.cache, self._start, logits, self._tree)

    @property
    def stats(self) -> dict | None:
        return None if self.speculation is None else self.speculation.stats.as_dict()
