"""Registered documents: id -> chunk texts, kept where every server sharing the store can read them.

A document's id is a hash of its text, so two servers given the same text agree on it. Its chunks (cut by
:func:`kvstash.splitting.document_chunks`, as ``kvstash ingest`` cuts files) are document segments;
registering one computes each chunk's standalone KV into the chunk store, so a later chat request naming
the document finds the KV there.

Where the registry lives follows the store spec: in Redis (``kvstash-docs:<tier prefix><id>``) when the
store has a Redis tier, else as JSON files in ``<disk dir>/documents/`` when it has a disk tier, else in
process memory. The Redis keys sit outside the tier's own prefix so the tier's scans (``keys``, ``verify``,
``clear``) never see them as chunk records.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
from redis.exceptions import RedisError

from kvstash.engine import Engine
from kvstash.splitting import document_chunks
from kvstash.store import parse_spec

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
    kind = "redis"

    def __init__(self, url: str, key_prefix: str) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.key_prefix = key_prefix

    def _call(self, op: str, fn):
        try:
            return fn()
        except (RedisError, OSError) as e:
            raise RegistryUnavailable(f"document registry in Redis: {op} failed: {e}") from e

    def get(self, doc_id: str) -> Document | None:
        raw = self._call("get", lambda: self._client.get(self.key_prefix + doc_id))
        return Document.from_json(raw) if raw is not None else None

    def put(self, doc: Document) -> None:
        self._call("set", lambda: self._client.set(self.key_prefix + doc.id, doc.to_json()))

    def delete(self, doc_id: str) -> bool:
        return self._call("delete", lambda: self._client.delete(self.key_prefix + doc_id)) > 0

    def close(self) -> None:
        self._client.close()


def open_registry(store_spec: str) -> DocumentRegistry:
    """The registry that goes with a store spec (see the module docstring). ValueError on a bad spec."""
    tiers = parse_spec(store_spec)
    for t in tiers:
        if t.kind == "redis":
            return RedisRegistry(t.url, DOCS_KEY_PREFIX + t.prefix)
    for t in tiers:
        if t.kind == "disk":
            return DiskRegistry(Path(t.path) / "documents")
    return MemoryRegistry()
