"""Reading a stored chunk's KV one layer at a time, so a prefill can start on layer 0 while the later
layers are still on their way from disk or Redis.

:meth:`kvstash.store.base.Tier.open_layers` reads a record's head (header and ``head_sum``) and returns a
:class:`LayerReader`; each :meth:`LayerReader.layer` range-reads one block and checks it against the
header's ``layer_sums`` before decoding it, so a reader never hands out bytes the writer did not store.
The reader knows nothing about tiers: the tier gives it ``fetch`` (exact bytes or a counted
:class:`LayerReadError`) and ``drop`` (count a corrupt record and remove it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from kvstash.store.record import CHECKSUM_SIZE, CorruptRecord, RecordHeader, check_checksum, decode_layer, layer_range

Buffer = bytes | bytearray | memoryview
Fetch = Callable[[int, int], Buffer]  # (offset, length) -> exactly length bytes, or raises LayerReadError
Drop = Callable[[CorruptRecord], None]  # count the record corrupt and remove it from its tier
OnComplete = Callable[[bytes], None]  # gets the whole verified record (TieredStore promotes it)


class LayerReadError(Exception):
    """A layer could not be read intact; the tier has already counted why. Recompute the chunk.

    ``reason``: checksum or truncated (the record was damaged: counted ``corrupt`` and removed), gone (removed
    or evicted after it was opened: not counted, nothing is wrong), backend (the tier failed: counted in
    ``errors``), failed (an earlier layer of this reader failed for one of those reasons).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"layer read failed ({reason}): {detail}")
        self.reason = reason


class LayerReader:
    """One opened record, read a layer at a time in any order. Safe for one consumer thread (a lock
    serializes calls); use it as a context manager or call :meth:`close`.

    With ``on_complete`` the reader keeps a copy of each block it reads; when every layer was read intact,
    :meth:`close` reassembles the exact record, checks its closing checksum and hands it to ``on_complete``
    (nothing is promoted after a partial or failed read).
    """

    def __init__(
        self,
        key: str,
        tier: str,
        header: RecordHeader,
        fetch: Fetch,
        drop: Drop,
        head: Buffer | None = None,
        on_complete: OnComplete | None = None,
    ) -> None:
        if on_complete is not None and (head is None or len(head) != header.payload_offset):
            raise ValueError("a LayerReader with on_complete needs the record's head bytes (up to payload_offset)")
        self.key = key
        self.tier = tier  # name of the tier the layers come from (ram, disk, redis, redis-cluster)
        self.header = header
        self.token_ids = list(header.token_ids)
        self.positions = torch.tensor(header.positions, dtype=torch.int64)  # [tokens]
        self.shape = header.shape  # [layers, kv_heads, tokens, head_dim]
        self.dtype = header.dtype
        self.num_layers = header.shape[0]
        self._fetch = fetch
        self._drop = drop
        self._head = bytes(head) if on_complete is not None else None  # bytes before block 0
        self._on_complete = on_complete
        self._blocks: dict[int, bytes] = {}  # layer -> its block (only with on_complete)
        self._tail = b""  # the closing checksum, read with the last block (only with on_complete)
        self._failed: LayerReadError | None = None
        self._closed = False
        self._lock = threading.Lock()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Read, check and decode one layer: (k, v), each [kv_heads, tokens, head_dim] in :attr:`dtype`.

        Raises LayerReadError (counted by the tier; a damaged record is removed) if the block is not intact,
        and for every call after a failure; ValueError for a layer the record does not have or after close.
        """
        offset, length = layer_range(self.header, layer)
        last = layer == self.num_layers - 1
        with self._lock:
            if self._closed:
                raise ValueError(f"LayerReader of {self.key} is closed; open the record again")
            if self._failed is not None:
                raise LayerReadError("failed", f"an earlier layer failed: {self._failed}")
            try:
                data = memoryview(self._fetch(offset, length + (CHECKSUM_SIZE if last else 0))).cast("B")
                k, v = decode_layer(self.header, layer, data[:length])
            except CorruptRecord as e:
                self._drop(e)
                self._failed = LayerReadError(e.reason, str(e))
                raise self._failed from e
            except LayerReadError as e:
                self._failed = e
                raise
            if self._on_complete is not None:
                self._blocks[layer] = bytes(data[:length])  # a copy: the caller may modify k and v in place
                if last:
                    self._tail = bytes(data[length:])
            return k, v

    def close(self) -> None:
        """Release the reader; with ``on_complete``, first promote the record if every layer was read intact.
        A record that fails its closing checksum then is counted corrupt and removed, not promoted."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            read_all = len(self._blocks) == self.num_layers and len(self._tail) == CHECKSUM_SIZE
            complete = self._failed is None and read_all
            if self._on_complete is None or not complete:
                self._blocks.clear()
                return
            assert self._head is not None
            blob = b"".join([self._head, *(self._blocks[i] for i in range(self.num_layers)), self._tail])
            self._blocks.clear()
        try:
            check_checksum(blob)
        except CorruptRecord as e:
            self._drop(e)
            return
        self._on_complete(blob)

    def __enter__(self) -> LayerReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
