"""Registered documents: id -> chunk texts, kept where every server sharing the store can read them.

A document's id is a hash of its text, so two servers given the same text agree on it. Its chunks (cut by
:func:`kvstash.splitting.document_chunks`, as ``kvstash ingest`` cuts files) are document segments;
registering one computes each chunk's standalone KV into the chunk store, so a later chat request naming
the document finds the KV there.

Where the registry lives follows the store spec: as JSON files in ``<disk dir>/documents/`` when the store
has a disk tier, else in process memory; and when the store has a Redis tier, also in Redis
(``kvstash-docs:<tier prefix><id>``), the registry every server sharing the store reads
(:class:`FallbackRegistry`: a Redis outage falls back to this server's own copy). The Redis keys sit
outside the tier's own prefix so the tier's scans (``keys``, ``verify``, ``clear``) never see them as chunk
records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

from redis.exceptions import RedisError

from kvstash.engine import Engine
from kvstash.splitting import document_chunks
from kvstash.store import parse_spec
from kvstash.store.redis_client import open_client

log = logging.getLogger("kvstash.server")

DOCS_KEY_PREFIX = "kvstash-docs:"
_ID_RE = re.compile(r"doc-[0-9a-f]{24}")


class RegistryUnavailable(RuntimeError):
    """The registry's backend (Redis, the disk) failed; the request can be retried later."""


@dataclass(frozen=True)
class Document:
    id: str
    chunks: tuple[str, ...]  # chunk texts, in order; each becomes one document segment
    tokens: int  # tokens of all chunks as placed in a prompt
    created: int  # unix time of registration

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Document:
        d = json.loads(text)
        return cls(d["id"], tuple(d["chunks"]), int(d["tokens"]), int(d["created"]))


def document_id(text: str) -> str:
    """The content-derived id of a document's text."""
    return "doc-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def valid_id(doc_id: str) -> bool:
    return bool(_ID_RE.fullmatch(doc_id))


def compute_document(engine: Engine, text: str, max_tokens: int) -> Document:
    """Chunk ``text`` as ``kvstash ingest`` does and put each chunk's standalone KV into the engine's store
    (computed where the store lacks it). Runs the model: call it from the model worker only.
    ValueError for a blank text."""
    chunks = document_chunks(engine.builder, text, max_tokens)
    if not chunks:
        raise ValueError("the document text is empty")
    report = engine.ingest(chunks)
    return Document(document_id(text), tuple(chunks), report.tokens, int(time.time()))


# --- registries -------------------------------------------------------------------------------------


class DocumentRegistry(ABC):
    """id -> Document. Methods are thread-safe; backend failures raise RegistryUnavailable."""

    kind: str

    @abstractmethod
    def get(self, doc_id: str) -> Document | None:
        """The document, or None if no such id is registered."""

    @abstractmethod
    def put(self, doc: Document) -> None:
        """Register (or re-register) ``doc``."""

    @abstractmethod
    def delete(self, doc_id: str) -> bool:
        """Forget ``doc_id``; returns whether it was registered. The chunk KV stays in the store (it is
        content-addressed and may be shared) until the store evicts it."""

    def close(self) -> None:
        return None


class MemoryRegistry(DocumentRegistry):
    kind = "memory"

    def __init__(self) -> None:
        self._docs: dict[str, Document] = {}
        self._lock = threading.Lock()

    def get(self, doc_id: str) -> Document | None:
        with self._lock:
            return self._docs.get(doc_id)

    def put(self, doc: Document) -> None:
        with self._lock:
            self._docs[doc.id] = doc

    def delete(self, doc_id: str) -> bool:
        with self._lock:
            return self._docs.pop(doc_id, None) is not None


class DiskRegistry(DocumentRegistry):
    """One JSON file per document, written atomically (several processes may share the directory)."""

    kind = "disk"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, doc_id: str) -> Path:
        return self.root / f"{doc_id}.json"

    def get(self, doc_id: str) -> Document | None:
        try:
            return Document.from_json(self._path(doc_id).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as e:
            raise RegistryUnavailable(f"cannot read document {doc_id} from {self.root}: {e}") from e

    def put(self, doc: Document) -> None:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{doc.id}.", suffix=".tmp", dir=self.root)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(doc.to_json())
            os.replace(tmp, self._path(doc.id))
        except OSError as e:
            raise RegistryUnavailable(f"cannot write document {doc.id} to {self.root}: {e}") from e

    def delete(self, doc_id: str) -> bool:
        try:
            self._path(doc_id).unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            raise RegistryUnavailable(f"cannot delete document {doc_id} from {self.root}: {e}") from e


class RedisRegistry(DocumentRegistry):
    """Documents as JSON strings in Redis. Deleting one leaves a tombstone (``<prefix>deleted:<id>``) so that
    servers holding a local copy (:class:`FallbackRegistry`) can tell a deleted document from a lost one."""

    kind = "redis"

    def __init__(self, url: str, key_prefix: str) -> None:
        self._client = open_client(url, socket_timeout=2.0)  # one Redis server or a Redis Cluster
        self.key_prefix = key_prefix

    def _call(self, op: str, fn):
        try:
            return fn()
        except (RedisError, OSError) as e:
            raise RegistryUnavailable(f"document registry in Redis: {op} failed: {e}") from e

    def _tombstone(self, doc_id: str) -> str:
        return f"{self.key_prefix}deleted:{doc_id}"

    def get(self, doc_id: str) -> Document | None:
        """The document, or None if absent. A damaged entry is logged and read as absent (a server with a
        local copy writes it back)."""
        raw = self._call("get", lambda: self._client.get(self.key_prefix + doc_id))
        if raw is None:
            return None
        try:
            return Document.from_json(raw)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("document registry in Redis: entry %s is damaged (%s); reading it as absent", doc_id, e)
            return None

    def put(self, doc: Document) -> None:
        self._call("set", lambda: self._client.set(self.key_prefix + doc.id, doc.to_json()))
        self._call("delete", lambda: self._client.delete(self._tombstone(doc.id)))

    def delete(self, doc_id: str) -> bool:
        had = self._call("delete", lambda: self._client.delete(self.key_prefix + doc_id)) > 0
        if had:
            self.mark_deleted(doc_id)
        return had

    def ids(self) -> list[str]:
        """Every registered document's id (a scan over every node of a cluster)."""
        keys = self._call("scan", lambda: list(self._client.scan_iter(match=self.key_prefix + "doc-*", count=500)))
        return [k.decode()[len(self.key_prefix) :] for k in keys]

    def mark_deleted(self, doc_id: str) -> None:
        """Leave the tombstone of ``doc_id`` (done by :meth:`delete` when the entry was there)."""
        self._call("set", lambda: self._client.set(self._tombstone(doc_id), b"1"))

    def deleted(self, doc_id: str) -> bool:
        """Whether ``doc_id`` was deleted (and not registered again) since Redis last started empty."""
        return self._call("exists", lambda: self._client.exists(self._tombstone(doc_id))) > 0

    def close(self) -> None:
        self._client.close()


@dataclass
class RegistryCounts:
    """What happened between a :class:`FallbackRegistry` and its shared registry (read by the metrics)."""

    fallbacks: int = 0  # reads answered from the local copy because the shared registry failed
    writebacks: int = 0  # entries the shared registry had lost, written back from the local copy on use
    errors: int = 0  # shared registry operations that failed (each read, write or delete)
    mirrored: int = 0  # documents another server registered, copied into this server's own copy


class FallbackRegistry(DocumentRegistry):
    """The shared registry (Redis) with this server's own copy beside it (``local``: memory, or the disk
    tier's directory) of every document it registered or served.

    Reads try the shared registry; when it fails (and for ``retry_interval`` seconds after, so an outage costs
    no timeouts) they are answered from the local copy and counted in ``counts.fallbacks``. A document the
    shared registry lacks but the local copy holds was lost (Redis restarted empty) unless a tombstone says it
    was deleted: it is written back on use. Registering during an outage succeeds locally (the entry reaches
    Redis on its next use); deleting needs the shared registry (RegistryUnavailable, 503, during an outage).
    :meth:`start_mirror` also copies, every few seconds, the documents other servers registered, so that an
    outage costs only the documents registered since the last copy on another server."""

    def __init__(self, shared: RedisRegistry, local: DocumentRegistry, retry_interval: float = 1.0) -> None:
        self.shared, self.local = shared, local
        self.kind = f"{shared.kind}+{local.kind}"
        self.retry_interval = retry_interval
        self.counts = RegistryCounts()
        self._known: set[str] = set()  # ids this process has put in the local copy
        self._down_until = 0.0  # monotonic time until which the shared registry is not tried
        self._outage = False  # whether the last call to the shared registry failed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._mirror: threading.Thread | None = None

    def mirror(self) -> int:
        """Copy the shared registry's documents this server does not hold yet into its own copy; returns how
        many. RegistryUnavailable during an outage (nothing changes)."""
        ids = self._shared("scan", lambda _: self.shared.ids(), None)
        with self._lock:
            missing = [i for i in ids if i not in self._known]
        n = 0
        for doc_id in missing:
            doc = self._shared("get", self.shared.get, doc_id)
            if doc is not None and not self._stop.is_set():
                self._keep(doc)
                n += 1
        with self._lock:
            self.counts.mirrored += n
        return n

    def start_mirror(self, interval_s: float) -> None:
        """Run :meth:`mirror` now and every ``interval_s`` seconds on a daemon thread, until :meth:`close`."""

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.mirror()
                except RegistryUnavailable:
                    pass  # counted by _shared; the next round tries again
                except Exception:  # noqa: BLE001 - a mirror round must never take the server down
                    log.exception("document registry: copying other servers' documents failed")
                self._stop.wait(interval_s)

        self._mirror = threading.Thread(target=loop, name="kvstash-registry-mirror", daemon=True)
        self._mirror.start()

    def get(self, doc_id: str) -> Document | None:
        try:
            doc = self._shared("get", self.shared.get, doc_id)
        except RegistryUnavailable:
            return self._fallback(doc_id)
        if doc is not None:
            self._keep(doc)
            return doc
        return self._recover(doc_id)

    def put(self, doc: Document) -> None:
        self._keep(doc, force=True)
        try:
            self._shared("set", self.shared.put, doc)
        except RegistryUnavailable as e:
            log.warning("%s; %s is registered on this server and reaches Redis on its next use", e, doc.id)

    def delete(self, doc_id: str) -> bool:
        had = self._shared("delete", self.shared.delete, doc_id)  # raises during an outage: nothing changes
        with self._lock:
            self._known.discard(doc_id)
        had_local = self.local.delete(doc_id)
        if had_local and not had:
            self._shared("set", self.shared.mark_deleted, doc_id)
        return had or had_local

    def close(self) -> None:
        self._stop.set()
        if self._mirror is not None:
            self._mirror.join(timeout=5)
        self.shared.close()
        self.local.close()

    def _shared(self, op: str, fn, arg):
        """``fn(arg)`` on the shared registry; RegistryUnavailable (counted) when it fails or failed lately."""
        with self._lock:
            down = time.monotonic() < self._down_until
            self.counts.errors += down
        if down:
            raise RegistryUnavailable(f"document registry in Redis: {op} skipped, it failed less than a moment ago")
        try:
            result = fn(arg)
        except RegistryUnavailable as e:
            with self._lock:
                first, self._outage = not self._outage, True
                self._down_until = time.monotonic() + self.retry_interval
                self.counts.errors += 1
            if first:
                log.warning("%s; answering from this server's own copy of the documents until it is back", e)
            raise
        if self._outage:
            with self._lock:
                back, self._outage = self._outage, False
            if back:
                log.warning("document registry in Redis answers again")
        return result

    def _fallback(self, doc_id: str) -> Document | None:
        with self._lock:
            self.counts.fallbacks += 1
        return self.local.get(doc_id)

    def _recover(self, doc_id: str) -> Document | None:
        """The shared registry answered but lacks ``doc_id``: write the local copy back unless it was deleted."""
        doc = self.local.get(doc_id)
        if doc is None:
            return None
        try:
            if self._shared("exists", self.shared.deleted, doc_id):
                with self._lock:
                    self._known.discard(doc_id)
                self.local.delete(doc_id)
                return None
            self._shared("set", self.shared.put, doc)
        except RegistryUnavailable:
            return doc
        with self._lock:
            self.counts.writebacks += 1
        log.warning("document registry in Redis had lost %s (restarted empty?); wrote it back", doc_id)
        return doc

    def _keep(self, doc: Document, force: bool = False) -> None:
        """Put ``doc`` in the local copy unless this process already did."""
        with self._lock:
            if doc.id in self._known and not force:
                return
            self._known.add(doc.id)
        self.local.put(doc)


def open_registry(store_spec: str) -> DocumentRegistry:
    """The registry that goes with a store spec (see the module docstring). ValueError on a bad spec."""
    tiers = parse_spec(store_spec)
    disk = next((t for t in tiers if t.kind == "disk"), None)
    local = DiskRegistry(Path(disk.path) / "documents") if disk is not None else MemoryRegistry()
    for t in tiers:
        if t.kind in ("redis", "redis-cluster"):
            return FallbackRegistry(RedisRegistry(t.url, DOCS_KEY_PREFIX + t.prefix), local)
    return local
