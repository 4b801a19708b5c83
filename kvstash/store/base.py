"""The tier interface: a dict from chunk key to an encoded record that lives somewhere (RAM, disk, Redis).

:class:`Tier` owns the shared work (encode, checksum and key verification, token-id comparison, counters);
a tier subclass supplies only byte storage: ``_read``, ``_write``, ``_remove``, ``_iter_keys``, ``_heads``,
``_read_range`` where the backend reads byte ranges (for :meth:`Tier.open_layers`), and where its counters
live (``_make_counters``: this process's, or shared through the backend).
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

from kvstash.store.chunk import ChunkKV
from kvstash.store.codec_registry import get_codec
from kvstash.store.counters import Counters
from kvstash.store.layers import Buffer, LayerReader, LayerReadError, OnComplete
from kvstash.store.record import (
    CorruptRecord,
    RecordHeader,
    chunk_key,
    decode_record,
    encode_record,
    parse_record_head,
)
from kvstash.store.scan import CodecUsage, HeadInfo, summarize

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"[0-9A-Za-z_-]{1,128}")  # what a chunk key may be (safe as a file name)
LAYERS_HEAD_READ = 16 * 1024  # open_layers' first range read: the whole header of all but unusual records


@dataclass(frozen=True)
class StoreConfig:
    """What every tier of one store agrees on: whose KV it holds and how it is encoded."""

    model_fingerprint: str  # identifies model weights + dtype; part of every key and record header
    codec: str = "fp16"  # codec name from kvstash.store.codec (fp32, fp16, bf16, ...)

    def __post_init__(self) -> None:
        if not self.model_fingerprint:
            raise ValueError("StoreConfig.model_fingerprint is empty; pass the model's fingerprint string")
        get_codec(self.codec)  # ValueError listing the known codecs

    def key(self, token_ids: Sequence[int]) -> str:
        """The content key of a chunk of ``token_ids`` under this model and codec."""
        return chunk_key(self.model_fingerprint, token_ids, self.codec)


@dataclass(frozen=True)
class TierStats:
    """A tier's contents, read from its records (every process's), and its event counters."""

    name: str  # tier kind: ram, disk, redis, redis-cluster
    entries: int  # records held now
    bytes: int  # bytes of records held now (encoded, headers included)
    hits: int  # gets that returned a chunk
    misses: int  # gets that returned None (absent, corrupt, token-id mismatch, tier error)
    evictions: int  # records removed to stay within the byte budget
    corrupt: int  # records found damaged (on get or verify) and removed
    errors: int  # backend failures (I/O, network) turned into misses or skipped writes
    rejected: int  # puts not stored because one record is larger than the whole budget
    puts: int  # records written
    bytes_per_token: float  # record bytes per token over the records held now (readable headers)
    budget_bytes: int | None = None  # byte budget; None = unbounded (or bounded by the backend)
    tokens: int = 0  # tokens in the records held now
    unreadable: int = 0  # records held whose header is damaged or foreign (verify removes them)
    codecs: dict[str, CodecUsage] = field(default_factory=dict)  # entries, bytes, tokens per codec
    counters: str = "shared"  # "shared": counts of every process using the tier; "process": this one's

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


class VerifyResult(NamedTuple):
    checked: int  # records read
    ok: int  # records intact
    removed: int  # records found corrupt and removed


class Hit(NamedTuple):
    """What a read found: the verified chunk, the tier it came from, and its record (so promotion to another
    tier needs no re-encode)."""

    chunk: ChunkKV
    tier: str | None  # the tier that had it (ram, disk, redis); None: computed now (ChunkSource.standalone)
    blob: bytes | bytearray


class Tier(ABC):
    """One storage level. Every public method is thread-safe and never raises for backend trouble:
    a failure is a miss (get) or a skipped write (put), counted in :meth:`stats`.
    Keys are ``[0-9A-Za-z_-]{1,128}`` (what :func:`chunk_key` makes); anything else is a ValueError.
    """

    name: ClassVar[str]

    def __init__(self, config: StoreConfig, budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"{self.name} budget must be a positive number of bytes, got {budget_bytes}")
        self.config = config
        self.budget_bytes = budget_bytes
        self.counters = self._make_counters()
        weakref.finalize(self, self.counters.close)  # push pending counts when dropped or at exit
        self._failing: set[str] = set()  # parts in an outage ("" = the whole backend, or a cluster node)
        self._failing_lock = threading.Lock()

    # --- what a tier supplies -------------------------------------------------------------------

    @abstractmethod
    def _read(self, key: str, touch: bool = True) -> bytes | bytearray | None:
        """The blob under ``key`` or None; ``touch`` marks it recently used."""

    @abstractmethod
    def _write(self, key: str, blob: bytes) -> bool:
        """Store ``blob`` (evicting as needed); False if it was not stored (already counted)."""

    @abstractmethod
    def _remove(self, key: str) -> bool:
        """Remove ``key``; False if it was not there."""

    @abstractmethod
    def _iter_keys(self) -> Iterator[str]:
        """Keys held now (a snapshot is fine)."""

    @abstractmethod
    def _heads(self) -> Iterator[tuple[int, HeadInfo | None]]:
        """(size, parsed header) of every record held now, reading headers only (see :mod:`.scan`)."""

    def _make_counters(self) -> Counters:
        """Where the event counters live; this process's unless a tier shares them through its backend."""
        return Counters()

    def _contains(self, key: str) -> bool:
        return self._read(key, touch=False) is not None

    def _read_range(self, key: str, offset: int, length: int, touch: bool = False) -> Buffer | None:
        """Up to ``length`` bytes of the record under ``key`` from ``offset``: fewer where the record ends
        sooner, b"" where it is absent; None where the backend failed (counted). ``touch`` marks it recently
        used. This default slices what ``_read`` returns (no copy); tiers that can read a range override it."""
        blob = self._read(key, touch=touch)
        if blob is None:
            return b""
        return memoryview(blob)[offset : offset + length]

    def _read_many(self, keys: Sequence[str]) -> list[bytes | bytearray | None]:
        return [self._read(k) for k in keys]

    def _clear(self) -> None:
        for key in list(self._iter_keys()):
            self._remove(key)

    def gc(self) -> int:
        """Housekeeping (stale temp files, budget re-check). Returns how many things it removed."""
        return 0

    def close(self) -> None:
        """Push pending counts, release connections or handles; the tier is not used afterwards."""
        self.counters.close()

    # --- the shared interface -------------------------------------------------------------------

    def get(self, key: str, token_ids: Sequence[int]) -> Hit | None:
        """The chunk under ``key`` if present, intact and holding exactly ``token_ids``, with its verified blob;
        else None. Marks it recently used; removes it if corrupt."""
        _check_key(key)
        return self._verify_hit(key, token_ids, self._read(key))

    def get_many(self, keys: Sequence[str], token_ids_list: Sequence[Sequence[int]]) -> list[Hit | None]:
        """:meth:`get` for several keys at once (one round trip where the backend allows)."""
        if len(keys) != len(token_ids_list):
            raise ValueError(f"get_many got {len(keys)} keys but {len(token_ids_list)} token-id lists")
        for key in keys:
            _check_key(key)
        blobs = self._read_many(keys)
        return [self._verify_hit(k, t, b) for k, t, b in zip(keys, token_ids_list, blobs, strict=True)]

    def open_layers(
        self, key: str, token_ids: Sequence[int], on_complete: OnComplete | None = None
    ) -> LayerReader | None:
        """A reader of the record under ``key`` one layer at a time, or None (a miss) unless the record is
        present with an intact header for exactly ``token_ids`` and this model. Reads only the record's head
        now (one range read, two for a long header); counts a hit and marks the record recently used; a
        damaged header is counted corrupt and the record removed, like :meth:`get`. ``on_complete(blob)`` is
        called by the reader's ``close()`` with the whole verified record once every layer was read intact."""
        _check_key(key)
        try:
            head = self._open_head(key)
            if head is not None and head[0].key != key:
                raise CorruptRecord("key", f"holds key {head[0].key!r}, expected {key!r}")
        except CorruptRecord as e:
            self._drop_corrupt(key, e)
            head = None
        if head is None or head[0].token_ids != _as_ids(token_ids) or head[0].model != self.config.model_fingerprint:
            self._count(misses=1)  # absent, damaged, a key collision or a caller's stale key: never serve it
            return None
        self._count(hits=1)
        header, raw = head
        return LayerReader(
            key,
            self.name,
            header,
            fetch=lambda offset, length: self._fetch_range(key, offset, length),
            drop=lambda err: self._drop_corrupt(key, err),
            head=raw[: header.payload_offset] if on_complete is not None else None,
            on_complete=on_complete,
        )

    def blob(self, key: str) -> bytes | bytearray | None:
        """The raw record under ``key`` (unverified, LRU order unchanged), for inspection; None if absent."""
        _check_key(key)
        return self._read(key, touch=False)

    def put(self, key: str, chunk: ChunkKV) -> bool:
        """Encode ``chunk`` with the config's codec and store it under ``key``, evicting LRU records if
        the budget needs room. Returns whether it was stored."""
        _check_key(key)
        blob = encode_record(key, self.config.model_fingerprint, self.config.codec, chunk)
        return self.put_blob(key, blob)

    def put_blob(self, key: str, blob: bytes | bytearray) -> bool:
        """Store an already-encoded record (from :func:`encode_record` or another tier's :class:`Hit`)."""
        _check_key(key)
        stored = self._write(key, bytes(blob))
        if stored:
            self._count(puts=1)
        return stored

    def contains(self, key: str) -> bool:
        """Whether a record is held under ``key`` (not verified, LRU order unchanged)."""
        _check_key(key)
        return self._contains(key)

    def delete(self, key: str) -> bool:
        """Remove ``key``; returns whether it was there."""
        _check_key(key)
        return self._remove(key)

    def keys(self) -> Iterator[str]:
        """Iterate over the keys held now."""
        return self._iter_keys()

    def clear(self) -> None:
        """Remove every record of this tier (counters are kept)."""
        self._clear()

    def verify(self) -> VerifyResult:
        """Read and check every record; remove (and count as corrupt) the damaged ones. LRU order kept."""
        checked = ok = removed = 0
        for key in list(self._iter_keys()):
            blob = self._read(key, touch=False)
            if blob is None:  # removed meanwhile
                continue
            checked += 1
            try:
                decode_record(blob, expect_key=key)
                ok += 1
            except CorruptRecord as e:
                self._drop_corrupt(key, e)
                removed += 1
        return VerifyResult(checked, ok, removed)

    def stats(self) -> TierStats:
        """Entries, bytes, tokens per codec from the records held now (headers only), and the counters
        (every process's for a shared tier: pending counts are pushed first)."""
        usage = summarize(self._heads())
        return TierStats(
            name=self.name,
            entries=usage.entries,
            bytes=usage.bytes,
            bytes_per_token=usage.bytes_per_token,
            budget_bytes=self.budget_bytes,
            tokens=usage.tokens,
            unreadable=usage.unreadable,
            codecs=usage.codecs,
            counters=self.counters.scope,
            **self.counters.totals(),
        )

    # --- helpers for subclasses -----------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        self.counters.add(**deltas)

    def _backend_error(self, op: str, err: BaseException, where: str = "") -> None:
        """Count a backend failure; log a warning at the first one of an outage (of ``where``) only."""
        self._count(errors=1)
        with self._failing_lock:
            first = where not in self._failing
            self._failing.add(where)
        if first:
            at = f" at {where}" if where else ""
            log.warning("%s tier: %s%s failed (%s); treating as a miss until it recovers", self.name, op, at, err)

    def _backend_ok(self, where: str = "") -> None:
        if where in self._failing:
            with self._failing_lock:
                was = where in self._failing
                self._failing.discard(where)
            if was:
                log.warning("%s tier: working again%s", self.name, f" at {where}" if where else "")

    def _verify_hit(self, key: str, token_ids: Sequence[int], blob: bytes | bytearray | None) -> Hit | None:
        if blob is None:
            self._count(misses=1)
            return None
        try:
            record = decode_record(blob, expect_key=key)
        except CorruptRecord as e:
            self._drop_corrupt(key, e)
            self._count(misses=1)
            return None
        chunk = record.chunk
        if chunk.token_ids != _as_ids(token_ids) or record.model_fingerprint != self.config.model_fingerprint:
            self._count(misses=1)  # a key collision or a caller's stale key: never serve it
            return None
        self._count(hits=1)
        return Hit(chunk, self.name, blob)

    def _open_head(self, key: str) -> tuple[RecordHeader, Buffer] | None:
        """The checked header of the record under ``key`` and the bytes read from its start (at least up to
        ``payload_offset``); None if absent or unreadable now. Raises CorruptRecord for a damaged head."""
        head = self._read_range(key, 0, LAYERS_HEAD_READ, touch=True)
        if head is None or (len(head) == 0 and not self._contains(key)):
            return None
        parsed = parse_record_head(head)
        if parsed.missing:  # an unusually long header: read the rest of it
            rest = self._read_range(key, len(head), parsed.missing)
            if rest is None:
                return None
            head = bytes(head) + bytes(rest)
            parsed = parse_record_head(head)
        if parsed.header is None:
            raise CorruptRecord("truncated", f"the record ends after {len(head)} bytes, inside its header")
        return parsed.header, head

    def _fetch_range(self, key: str, offset: int, length: int) -> Buffer:
        """Exactly ``length`` bytes at ``offset`` of the record under ``key``, for a LayerReader. Raises
        LayerReadError after counting: a backend failure (errors), a record cut short (corrupt, removed)."""
        data = self._read_range(key, offset, length)
        if data is None:
            raise LayerReadError("backend", f"{self.name} tier could not be read (counted in errors)")
        if len(data) < length:
            if not self._contains(key):
                raise LayerReadError("gone", f"record {key} was removed or evicted after it was opened")
            err = CorruptRecord("truncated", f"the record ends before byte {offset + length}")
            self._drop_corrupt(key, err)
            raise LayerReadError("truncated", str(err))
        return data

    def _drop_corrupt(self, key: str, err: CorruptRecord) -> None:
        log.warning("%s tier: removing record %s: %s", self.name, key, err)
        self._count(corrupt=1)
        self._remove(key)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ValueError(f"bad chunk key {key!r}: make keys with chunk_key() or StoreConfig.key()")


def _as_ids(token_ids: Sequence[int]) -> list[int]:
    return token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
