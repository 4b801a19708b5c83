"""TieredStore: an ordered list of tiers, fastest first, used as one chunk store (whole chunks with ``get``,
or a layer at a time with ``open_layers``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kvstash.store.base import Hit, StoreConfig, Tier, TierStats, VerifyResult
from kvstash.store.chunk import ChunkKV
from kvstash.store.layers import LayerReader
from kvstash.store.record import encode_record


class TieredStore:
    """Lookups walk the tiers in order; a hit in a slower tier is copied (as the same verified blob) into
    every faster tier. Writes encode once and go to every tier. All methods are thread-safe."""

    def __init__(self, tiers: Sequence[Tier]) -> None:
        if not tiers:
            raise ValueError("TieredStore needs at least one tier, e.g. open_store('ram')")
        configs = {t.config for t in tiers}
        if len(configs) != 1:
            raise ValueError(f"all tiers must share one StoreConfig; got {sorted(map(str, configs))}")
        self.tiers = list(tiers)
        self.config: StoreConfig = tiers[0].config

    def key(self, token_ids: Sequence[int]) -> str:
        """The content key of a chunk of ``token_ids`` (see :func:`kvstash.store.record.chunk_key`)."""
        return self.config.key(token_ids)

    def get(self, key: str, token_ids: Sequence[int]) -> Hit | None:
        """The chunk from the fastest tier that has it intact with these token ids (``Hit.tier`` names it), or
        None. Promotes a hit into the faster tiers."""
        for i, tier in enumerate(self.tiers):
            hit = tier.get(key, token_ids)
            if hit is not None:
                self._promote(key, hit.blob, self.tiers[:i])
                return hit
        return None

    def open_layers(self, key: str, token_ids: Sequence[int]) -> LayerReader | None:
        """A layer-at-a-time reader of the chunk from the fastest tier that has it with an intact header for
        these token ids (``reader.tier`` names it), or None. A reader from a slower tier promotes the record
        into the faster tiers in its ``close()``, and only if every layer was read intact and the whole
        record's checksum holds; close it (or use it as a context manager) when done."""
        for i, tier in enumerate(self.tiers):
            faster = self.tiers[:i]
            promote = (lambda blob, faster=faster: self._promote(key, blob, faster)) if faster else None
            reader = tier.open_layers(key, token_ids, on_complete=promote)
            if reader is not None:
                return reader
        return None

    def get_many(self, keys: Sequence[str], token_ids_list: Sequence[Sequence[int]]) -> list[Hit | None]:
        """:meth:`get` for several chunks; each tier is asked once for the keys still missing."""
        if len(keys) != len(token_ids_list):
            raise ValueError(f"get_many got {len(keys)} keys but {len(token_ids_list)} token-id lists")
        found: list[Hit | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for i, tier in enumerate(self.tiers):
            if not missing:
                break
            hits = tier.get_many([keys[j] for j in missing], [token_ids_list[j] for j in missing])
            still = []
            for j, hit in zip(missing, hits, strict=True):
                if hit is None:
                    still.append(j)
                else:
                    found[j] = hit
                    self._promote(keys[j], hit.blob, self.tiers[:i])
            missing = still
        return found

    def put(self, key: str, chunk: ChunkKV) -> bool:
        """Encode ``chunk`` once and write it to every tier. Returns whether any tier stored it."""
        blob = encode_record(key, self.config.model_fingerprint, self.config.codec, chunk)
        stored = [tier.put_blob(key, blob) for tier in self.tiers]
        return any(stored)

    def contains(self, key: str) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def delete(self, key: str) -> bool:
        """Remove ``key`` from every tier; returns whether any tier had it."""
        return any([tier.delete(key) for tier in self.tiers])

    def keys(self) -> Iterator[str]:
        """Every key held by any tier, each once."""
        seen: set[str] = set()
        for tier in self.tiers:
            for key in tier.keys():  # noqa: SIM118 - a tier is not a dict
                if key not in seen:
                    seen.add(key)
                    yield key

    def stats(self) -> list[TierStats]:
        """One :class:`TierStats` per tier, fastest first."""
        return [tier.stats() for tier in self.tiers]

    def clear(self) -> None:
        for tier in self.tiers:
            tier.clear()

    def verify(self) -> list[VerifyResult]:
        return [tier.verify() for tier in self.tiers]

    def gc(self) -> int:
        return sum(tier.gc() for tier in self.tiers)

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _promote(key: str, blob: bytes | bytearray, faster: Sequence[Tier]) -> None:
        for tier in faster:
            tier.put_blob(key, blob)
