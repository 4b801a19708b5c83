"""Layer-wise loading of stored chunk KV: a thread puts layer l of every stored chunk into the prompt's cache
(keys re-positioned) while the layers before l compute, so reading from disk or Redis hides behind the
recompute (CacheBlend's loading pipeline; LMCache's layer-wise mode).

The pass's hooks call :meth:`LayerLoader.wait` before they read a layer's cached KV. A chunk whose layer
cannot be read (damaged bytes, a backend gone) is computed again on the spot from its tokens, stored again,
and its layers from the failed one on come from that computation: a cache problem costs time, never the answer.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from kvstash.cache.kv import KVCache
from kvstash.model.rope import reposition
from kvstash.reuse.report import PrefillReport
from kvstash.store.layers import LayerReader, LayerReadError


@dataclass
class Part:
    """One stored chunk being loaded: the segment it fills and its reader."""

    segment: int  # index into the plan's segments
    start: int  # first slot (and position) of the segment in the cache
    reader: LayerReader


class LayerLoader:
    """Loads every part's layers in order on a background thread; ``wait(l)`` returns once layer l of every
    part is in the cache (recomputing the parts whose reads failed)."""

    def __init__(self, cache: KVCache, parts: list[Part], rope, recompute, report: PrefillReport):
        self.cache, self.parts, self.rope = cache, parts, rope
        self.recompute = recompute  # token ids -> ChunkKV (computed standalone and stored again)
        self.report = report
        self.layers = cache.layers
        self._ready = [threading.Event() for _ in range(self.layers)]
        self._failed: dict[int, int] = {}  # part index -> first layer that could not be read
        self._repaired: set[int] = set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvstash-layers", daemon=True)
        self.load_s = 0.0  # time the loading thread spent (overlapped with compute)
        self.wait_s = 0.0  # time the pass spent waiting for layers (what loading added to the prefill)

    def start(self) -> LayerLoader:
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            for layer in range(self.layers):
                read: dict[int, tuple | None] = {}  # a chunk repeated in the prompt is read once per layer
                for i, part in enumerate(self.parts):
                    if i in self._failed:
                        continue
                    if id(part.reader) not in read:
                        read[id(part.reader)] = _read(part.reader, layer)
                    if read[id(part.reader)] is None:
                        self._failed[i] = layer
                    else:
                        self._place(part, layer, *read[id(part.reader)])
                self._ready[layer].set()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting pass, which re-raises it
            self._error = e
        finally:
            for reader in {id(p.reader): p.reader for p in self.parts}.values():
                reader.close()
            for event in self._ready:
                event.set()
            self.load_s = time.perf_counter() - t0

    def _place(self, part: Part, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [KVH, T, D]: one layer of the part's chunk, keys re-positioned to the part's place."""
        sl = slice(part.start, part.start + k.shape[1])
        new = torch.arange(sl.start, sl.stop)
        reposition(k, part.reader.positions, new, self.rope, out=self.cache.k[layer, :, sl])
        self.cache.v[layer, :, sl] = v

    def wait(self, layer: int) -> None:
        """Block until layer ``layer`` of every part is in the cache."""
        t = time.perf_counter()
        self._ready[layer].wait()
        if self._error is not None:
            raise RuntimeError(f"loading chunk KV failed: {self._error}") from self._error
        for i, first in list(self._failed.items()):
            if i not in self._repaired:
                self._repair(i, first)
        self.wait_s += time.perf_counter() - t

    def _repair(self, i: int, first: int) -> None:
        """Recompute part ``i`` (its layer ``first`` could not be read) and fill its layers from ``first`` on."""
        part = self.parts[i]
        chunk = self.recompute(part.reader.token_ids)
        sl = slice(part.start, part.start + chunk.num_tokens)
        new = torch.arange(sl.start, sl.stop)
        reposition(chunk.keys[first:], chunk.positions, new, self.rope, out=self.cache.k[first:, :, sl])
        self.cache.v[first:, :, sl] = chunk.values[first:]
        row = self.report.segments[part.segment]
        row.tier, row.reused, row.recomputed = None, 0, row.tokens
        self.report.misses += 1
        self._repaired.add(i)

    def finish(self) -> None:
        """Wait for every layer (the pass has normally waited for each already) and the thread."""
        self.wait(self.layers - 1)
        self._thread.join()


def _read(reader: LayerReader, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One layer of a chunk, or None when it cannot be read (the tier has counted why)."""
    try:
        return reader.layer(layer)
    except LayerReadError:
        return None
