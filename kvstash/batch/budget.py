"""The KV memory budget: how many bytes of KV cache all running sequences may hold together."""

from __future__ import annotations

import os

DEFAULT_RAM_SHARE = 0.25  # of physical memory, when no budget is given


def physical_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_kv_budget() -> int:
    """A quarter of physical memory: room for the weights, the store's RAM tier and the rest of the process."""
    return int(DEFAULT_RAM_SHARE * physical_memory())
