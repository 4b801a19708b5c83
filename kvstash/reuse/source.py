"""ChunkSource: where a prompt's segments get their cached KV, and where newly computed KV is kept.

Two kinds of entries share one content-addressed store:

- **standalone chunk KV** of a reusable segment (system prompt, document), computed as if the segment stood
  alone from position 0; keyed by the segment's own token ids. Reused at any position (naive, blend).
- **in-context prefix KV** of a leading segment, computed exactly as part of the prompt prefix; keyed by
  all the token ids from the start of the prompt through that segment. Reused only at the same place
  (prefix reuse). For the first segment both kinds are the same KV under the same key.

Every call records what it did (tiers hit, misses, time spent) in the request's :class:`PrefillReport`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from kvstash.cache.kv import KVCache
from kvstash.model.runner import Runner, Steps
from kvstash.prompt import PlannedSegment, PromptPlan
from kvstash.reuse.report import PrefillReport
from kvstash.store import ChunkKV, Hit, Prefetcher, StoreConfig, TieredStore, open_store
from kvstash.store.layers import LayerReader

DEFAULT_STORE = "ram:2GiB"


@dataclass(frozen=True)
class IngestReport:
    chunks: int  # chunks seen
    tokens: int  # their tokens
    stored: int  # chunks computed and stored
    skipped: int  # chunks the store already held
    failed: int  # chunks computed but not stored by any tier (too large for the budgets, backend down)
    computed_tokens: int  # tokens of the chunks computed
    seconds: float


class ChunkSource:
    """The engine's view of the chunk store: lookups by segment, standalone computation on a miss."""

    def __init__(self, runner: Runner, store: TieredStore, prefill_chunk: int = 512, layered: bool | None = None):
        self.runner = runner
        self.store = store
        self.prefill_chunk = prefill_chunk
        # hand stored chunks over layer by layer (loaded while the layers before compute): by default when the
        # store has a tier slower than RAM, where reading is worth hiding
        self.layered = any(t.name != "ram" for t in store.tiers) if layered is None else layered

    @classmethod
    def open(cls, runner: Runner, fingerprint: str, spec: str = DEFAULT_STORE, codec: str = "fp16", **kw):
        return cls(runner, open_store(spec, StoreConfig(fingerprint, codec)), **kw)

    def close(self) -> None:
        self.store.close()

    # --- keys -----------------------------------------------------------------------------------------
    def standalone_key(self, seg: PlannedSegment, head: tuple[int, ...] = ()) -> str:
        # With a head, the key is that of the in-context prefix head + segment: the very same KV.
        return self.store.key(head + seg.token_ids)

    def prefix_key(self, plan: PromptPlan, seg: PlannedSegment) -> str:
        return self.store.key(plan.token_ids[: seg.end])

    # --- exact prefix ---------------------------------------------------------------------------------
    def load_prefix(self, plan: PromptPlan, cache: KVCache, report: PrefillReport, limit: int) -> int:
        """Extend ``cache`` with the in-context KV of the longest run of leading segments the store has,
        looking at most at the first ``limit`` segments; marks them reused in ``report``. Returns how many
        segments were loaded."""
        n = 0
        for seg in plan.segments[:limit]:
            t = time.perf_counter()
            found = self.store.get(self.prefix_key(plan, seg), seg.token_ids)
            report.load_s += time.perf_counter() - t
            expected = torch.arange(seg.start, seg.end)
            if found is None or not torch.equal(found.chunk.positions, expected):
                break
            t = time.perf_counter()
            cache.extend(found.chunk.keys.to(cache.dtype), found.chunk.values.to(cache.dtype), expected)
            report.load_s += time.perf_counter() - t
            report.hit(found.tier)
            row = report.segments[n]
            row.reused, row.tier = row.tokens, found.tier
            n += 1
        return n

    def save_prefix(self, plan: PromptPlan, cache: KVCache, first: int, upto: int, report: PrefillReport) -> None:
        """Store the in-context KV of segments ``[first, upto)`` from an exactly computed ``cache``."""
        t = time.perf_counter()
        for seg in plan.segments[first:upto]:
            # written even if the key is present: ``contains`` does not verify, and a damaged record must heal
            sl = slice(seg.start, seg.end)
            chunk = ChunkKV(
                list(seg.token_ids),
                cache.keys[:, :, sl].clone(),
                cache.values[:, :, sl].clone(),
                torch.arange(seg.start, seg.end),
            )
            self.store.put(self.prefix_key(plan, seg), chunk)
        report.store_s += time.perf_counter() - t

    # --- standalone chunks ----------------------------------------------------------------------------
    def standalone(
        self,
        segments: list[PlannedSegment],
        report: PrefillReport,
        head: KVCache | None = None,
        head_ids: tuple[int, ...] = (),
        layered: bool = False,
    ) -> Steps[list[Hit | LayerReader]]:
        """Standalone chunk KV for each segment: from the store (loaded in background threads while
        misses are computed) or computed now and stored; a computed chunk comes back with ``tier=None``.
        ``layered`` (no ``head``): a stored chunk comes back as an open :class:`LayerReader` instead, its
        layers read later by the caller.

        With ``head`` (an exact cache of the prompt head ``head_ids``), chunks are computed behind that head
        instead of from position 0, so their first tokens are not attention sinks of their own. A chunk that
        appears more than once in the prompt is looked up (or computed) once and shared."""
        keys = [self.standalone_key(s, head_ids) for s in segments]
        if layered:
            return (yield from self._each(keys, segments, report, self.store.open_layers, None))
        with Prefetcher(self.store, max_workers=2) as pf:
            pf.start((k, s.token_ids) for k, s in zip(keys, segments, strict=True))
            return (yield from self._each(keys, segments, report, lambda key, _ids: pf.get(key), head))

    def _each(self, keys, segments, report: PrefillReport, lookup, head: KVCache | None) -> Steps[list]:
        """One hit (or layer reader) per segment: ``lookup(key, token_ids)`` first, a miss computed and stored;
        a repeated document gets the very same object (its KV is re-positioned by the caller)."""
        out, seen = [], {}
        for key, seg in zip(keys, segments, strict=True):
            if key in seen:
                out.append(seen[key])
                continue
            t = time.perf_counter()
            found = lookup(key, seg.token_ids)
            report.load_s += time.perf_counter() - t
            if found is not None:
                report.hit(found.tier)
            else:
                report.misses += 1
                found = yield from self._compute_and_store(key, seg.token_ids, head, report)
            out.append(seen.setdefault(key, found))
        return out

    def _compute_and_store(self, key: str, token_ids, head: KVCache | None, report: PrefillReport) -> Steps[Hit]:
        t = time.perf_counter()
        chunk = yield from self.compute_steps(token_ids, head)
        report.compute_s += time.perf_counter() - t
        t = time.perf_counter()
        self.store.put(key, chunk)
        report.store_s += time.perf_counter() - t
        return Hit(chunk, None, b"")

    def recompute(self, token_ids) -> ChunkKV:
        """A stored chunk that could not be read after all: computed standalone again and stored again."""
        chunk = self.compute(token_ids)
        self.store.put(self.store.key(token_ids), chunk)
        return chunk

    def compute(self, token_ids, head: KVCache | None = None) -> ChunkKV:
        """The standalone KV of ``token_ids``: from position 0, or right after the cached ``head``."""
        return self.runner.drive(self.compute_steps(token_ids, head))

    def compute_steps(self, token_ids, head: KVCache | None = None) -> Steps[ChunkKV]:
        """:meth:`compute` as steps (see :data:`kvstash.model.runner.Steps`)."""
        n0 = head.length if head is not None else 0
        cache = self.runner.new_cache(n0 + len(token_ids))
        if head is not None:
            cache.extend(head.keys, head.values, head.positions)
        yield from self.runner.prefill_steps(cache, token_ids, n0, self.prefill_chunk)
        sl = slice(n0, cache.length)
        return ChunkKV(
            list(token_ids), cache.keys[:, :, sl].clone(), cache.values[:, :, sl].clone(), cache.positions[sl].clone()
        )

    def ingest(self, chunks: Iterable[Sequence[int]], progress: Callable[[int], None] | None = None) -> IngestReport:
        """Compute and store the standalone KV of every chunk (token ids of a document segment) that the store
        lacks, under the key the reuse methods look up. Writes to every tier; calls ``progress(tokens)`` after
        each chunk."""
        t0 = time.perf_counter()
        seen = tokens = stored = skipped = failed = computed = 0
        for ids in chunks:
            seen, tokens = seen + 1, tokens + len(ids)
            key = self.store.key(ids)
            if self.store.contains(key):
                skipped += 1
            else:
                computed += len(ids)
                if self.store.put(key, self.compute(ids)):
                    stored += 1
                else:
                    failed += 1
            if progress is not None:
                progress(len(ids))
        return IngestReport(seen, tokens, stored, skipped, failed, computed, time.perf_counter() - t0)
