"""ChunkSource: where a prompt's segments get their cached KV, and where newly computed KV is kept.

Two kinds of entries share one content-addressed store:

- **standalone chunk KV** of a reusable segment (system prompt, document), computed as if the segment stood
  alone from position 0; keyed by the segment's own token ids. Reused at any position (naive, blend).
- **in-context prefix KV** of a leading segment, computed exactly as part of the prompt prefix; keyed by
  all the token ids from the start of the prompt through that segment. Reused only at the same place
  (prefix reuse). For the first segment both kinds are the same KV under the same key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from kvstash.chunk import ChunkKV
from kvstash.forward import Runner
from kvstash.kv import KVCache
from kvstash.prompt import PlannedSegment, PromptPlan
from kvstash.store import StoreConfig, TieredStore, open_store
from kvstash.store.prefetch import Prefetcher

DEFAULT_STORE = "ram:2GiB"


@dataclass
class Lookup:
    """What the store gave for one segment."""

    chunk: ChunkKV | None
    tier: str | None  # the tier that had it; None on a miss
    load_s: float = 0.0


@dataclass
class ChunkStats:
    """Per-request counters the reuse methods fill in."""

    load_s: float = 0.0
    compute_s: float = 0.0
    store_s: float = 0.0
    tier_hits: dict[str, int] = field(default_factory=dict)
    misses: int = 0

    def hit(self, tier: str) -> None:
        self.tier_hits[tier] = self.tier_hits.get(tier, 0) + 1


class ChunkSource:
    """The engine's view of the chunk store: lookups by segment, standalone computation on a miss."""

    def __init__(self, runner: Runner, store: TieredStore, prefill_chunk: int = 512):
        self.runner = runner
        self.store = store
        self.prefill_chunk = prefill_chunk

    @classmethod
    def open(cls, runner: Runner, fingerprint: str, spec: str = DEFAULT_STORE, codec: str = "fp16", **kw):
        return cls(runner, open_store(spec, StoreConfig(fingerprint, codec)), **kw)

    # --- keys -----------------------------------------------------------------------------------------
    def standalone_key(self, seg: PlannedSegment, head: tuple[int, ...] = ()) -> str:
        # With a head, the key is that of the in-context prefix head + segment: the very same KV.
        return self.store.key(head + seg.token_ids)

    def prefix_key(self, plan: PromptPlan, seg: PlannedSegment) -> str:
        return self.store.key(plan.token_ids[: seg.end])

    # --- exact prefix ---------------------------------------------------------------------------------
    def load_prefix(self, plan: PromptPlan, cache: KVCache, stats: ChunkStats, limit: int) -> list[str | None]:
        """Extend ``cache`` with the in-context KV of the longest run of leading segments the store has,
        looking at most at the first ``limit`` segments. Returns the tier of each segment loaded."""
        tiers: list[str | None] = []
        for seg in plan.segments[:limit]:
            t = time.perf_counter()
            found = self.store.fetch(self.prefix_key(plan, seg), seg.token_ids)
            stats.load_s += time.perf_counter() - t
            expected = torch.arange(seg.start, seg.end)
            if found is None or not torch.equal(found.chunk.positions, expected):
                break
            t = time.perf_counter()
            cache.extend(found.chunk.keys.to(cache.dtype), found.chunk.values.to(cache.dtype), expected)
            stats.load_s += time.perf_counter() - t
            stats.hit(found.tier)
            tiers.append(found.tier)
        return tiers

    def save_prefix(self, plan: PromptPlan, cache: KVCache, first: int, upto: int, stats: ChunkStats) -> None:
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
        stats.store_s += time.perf_counter() - t

    # --- standalone chunks ----------------------------------------------------------------------------
    def standalone(
        self,
        segments: list[PlannedSegment],
        stats: ChunkStats,
        head: KVCache | None = None,
        head_ids: tuple[int, ...] = (),
    ) -> list[Lookup]:
        """Standalone chunk KV for each segment: from the store (loaded in background threads while
        misses are computed) or computed now and stored.

        With ``head`` (an exact cache of the prompt head ``head_ids``), chunks are computed behind that head
        instead of from position 0, so their first tokens are not attention sinks of their own. A chunk that
        appears more than once in the prompt is looked up (or computed) once and shared."""
        keys = [self.standalone_key(s, head_ids) for s in segments]
        out: list[Lookup] = []
        seen: dict[str, Lookup] = {}
        with Prefetcher(SimpleNamespace(get=self.store.fetch), max_workers=2) as pf:
            pf.start((k, s.token_ids) for k, s in zip(keys, segments, strict=True))
            for key, seg in zip(keys, segments, strict=True):
                if key in seen:  # a repeated document: its KV is the same chunk, re-positioned by the caller
                    out.append(seen[key])
                    continue
                t = time.perf_counter()
                found = pf.get(key)
                stats.load_s += time.perf_counter() - t
                if found is not None:
                    stats.hit(found.tier)
                    out.append(seen.setdefault(key, Lookup(found.chunk, found.tier)))
                    continue
                stats.misses += 1
                t = time.perf_counter()
                chunk = self.compute(seg.token_ids, head)
                stats.compute_s += time.perf_counter() - t
                t = time.perf_counter()
                self.store.put(key, chunk)
                stats.store_s += time.perf_counter() - t
                out.append(seen.setdefault(key, Lookup(chunk, None)))
        return out

    @torch.inference_mode()
    def compute(self, token_ids, head: KVCache | None = None) -> ChunkKV:
        """The standalone KV of ``token_ids``: from position 0, or right after the cached ``head``."""
        from kvstash.reuse import compute_tokens

        n0 = head.length if head is not None else 0
        cache = self.runner.new_cache(n0 + len(token_ids))
        if head is not None:
            cache.extend(head.keys, head.values, head.positions)
        compute_tokens(self.runner, cache, token_ids, n0, self.prefill_chunk)
        sl = slice(n0, cache.length)
        return ChunkKV(
            list(token_ids), cache.keys[:, :, sl].clone(), cache.values[:, :, sl].clone(), cache.positions[sl].clone()
        )
