"""Kernel choices made by timing, remembered per machine so every process computes the same numbers.

:mod:`kvstash.model.head` and :mod:`kvstash.model.projections` each time two ways to run the same matmuls and
keep the faster. The two agree only to fp32 rounding, so if each process timed for itself, a busy moment could
flip the choice and two processes would write chunk KV that differs in its last bits (an ingest rerun would not
reproduce its records). The first process on a machine times and writes the answer to
``$KVSTASH_HOME/kernels.json``, keyed by what the answer depends on (the weights' shapes and dtype, the CPU,
the thread count, the torch version); later ones read it, and ones that start while it times wait for its
answer (a file lock).

``KVSTASH_KERNELS`` overrides: ``auto`` (the default: as above), ``torch`` (always the model's own modules) or
``onednn`` (oneDNN wherever it can run). Delete ``kernels.json`` to time again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kvstash.model.linear import faster
from kvstash.model.registry import kvstash_home

log = logging.getLogger(__name__)
MODES = ("auto", "torch", "onednn")
FILE = "kernels.json"


def mode() -> str:
    """``KVSTASH_KERNELS``, checked."""
    value = os.environ.get("KVSTASH_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(
            f"KVSTASH_KERNELS={value!r} is not one of {', '.join(MODES)}; unset it to time once and remember"
        )
    return value


def choose(what: str, plain: Callable[[int], object], candidate: Callable[[int], object], margin: float) -> bool:
    """Whether to run ``candidate`` instead of ``plain`` for ``what`` (a description of the weights, e.g.
    ``"head 49152x576 float32"``): forced by ``KVSTASH_KERNELS``, else remembered for this machine, else timed
    now (:func:`kvstash.model.linear.faster`) and remembered."""
    forced = mode()
    if forced != "auto":
        return forced == "onednn"
    key = f"{what} | {cpu()} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    path = kvstash_home() / FILE
    known = _read(path).get(key)
    if isinstance(known, bool):
        return known
    with _locked(path):  # processes starting together: the first times, the others wait and read its answer
        known = _read(path).get(key)
        if isinstance(known, bool):
            return known
        chosen = faster(plain, candidate, margin=margin)
        _write(path, {**_read(path), key: chosen})
    return chosen


def cpu() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring %s (%s): the kernels will be timed again", path, e)
        return {}
    return data if isinstance(data, dict) else {}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` + ``.lock`` while the block runs; none where it cannot be taken (a
    read-only home, a file system without locks): then two processes may time at once, as without it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 (closed below)
    except OSError as e:
        log.debug("no lock for %s: %s", path, e)
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            log.debug("no lock for %s: %s", path, e)
        yield  # closing the file releases the lock


def _write(path: Path, data: dict) -> None:
    """Atomically (a reader sees the old file or the new one), and never fatal: a read-only home only means
    the next process times again."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{FILE}.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("could not remember the kernel choice in %s: %s", path, e)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)  # a full disk must not leave half-written files behind
