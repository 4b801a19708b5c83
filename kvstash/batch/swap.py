"""Swap space for preemption: a preempted sequence's KV written to a file, read back when it resumes.

Reading a 4K-token sequence's KV back costs about a third of recomputing it (``benchmarks/preempt.py``), so the
scheduler swaps where it can and recomputes where it cannot: a cache that is not a plain dense one (quantized,
or evicted per head), a failed write (a full disk), or a file that does not read back intact (the safetensors
header checks sizes; a truncated or altered file fails to load) all fall back to recomputing, so a swap
problem costs time, never a wrong answer.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvstash.cache.kv import KVCache
from kvstash.model.runner import Runner

log = logging.getLogger("kvstash.batch")
_spaces = itertools.count(1)


class SwapSpace:
    """Files of swapped-out caches in ``directory`` (None: a private temporary directory, made on first use
    and removed with this object). File names carry the process id and this space's number, so servers sharing
    a directory never overwrite each other's. Counts what it did in ``written``, ``read`` and ``failed``; a
    failure is also logged with its reason."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self._dir = Path(directory) if directory is not None else None
        self._prefix = f"kvstash-swap-{os.getpid()}-{next(_spaces)}-"
        self.written = self.read = self.failed = 0

    @staticmethod
    def can_swap(cache: KVCache) -> bool:
        """A plain dense cache with the same positions in every layer and head (what :meth:`load` rebuilds)."""
        return type(cache) is KVCache and cache.uniform

    def save(self, name: str, cache: KVCache) -> Path | None:
        """Write ``cache``'s cached tokens to a file; its path, or None (counted) if it could not be written."""
        n = cache.length
        tensors = {"k": cache.k[:, :, :n], "v": cache.v[:, :, :n], "positions": cache.positions}
        if cache.bias is not None:
            tensors["bias"] = cache.bias[:, :, :n]
        try:
            path = self._directory() / f"{self._prefix}{name}.safetensors"
            part = path.with_suffix(".part")
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(part))
            part.replace(path)
        except OSError as e:
            self.failed += 1
            log.warning("could not swap out %s (it will be recomputed instead): %s", name, e)
            return None
        self.written += 1
        return path

    def load(self, path: Path, runner: Runner, room: int = 0) -> KVCache | None:
        """The cache saved at ``path``, rebuilt with ``room`` free slots; None (counted) if the file does not read
        back whole and in the runner's shapes. The file is removed either way."""
        try:
            t = load_file(str(path))
            k, v, positions = t["k"], t["v"], t["positions"]
            cache = runner.new_cache(positions.shape[0] + room)
            if k.shape != (cache.layers, cache.kv_heads, positions.shape[0], cache.head_dim) or v.shape != k.shape:
                raise ValueError(f"swapped K/V of shape {tuple(k.shape)} do not fit this model")
            cache.extend(k, v, positions)
            if "bias" in t:
                cache.bias = torch.zeros(cache.layers, cache.kv_heads, cache.capacity)
                cache.bias[:, :, : positions.shape[0]] = t["bias"]
        except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as e:
            self.failed += 1
            log.warning("could not read back swap file %s (recomputing instead): %s", path, e)
            return None
        finally:
            self.drop(path)
        self.read += 1
        return cache

    @staticmethod
    def drop(path: Path) -> None:
        path.unlink(missing_ok=True)

    def _directory(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="kvstash-swap-"))
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir
