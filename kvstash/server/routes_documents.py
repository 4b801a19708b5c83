"""``/v1/documents``: register a document (its chunks' KV computed on the model worker), read it back, forget it;
looking up the documents a chat names; and the registry's outage counters in ``/metrics``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client.core import CounterMetricFamily, Metric

from kvstash.server.documents import Document, DocumentRegistry, RegistryCounts, compute_document, valid_id
from kvstash.server.errors import job_error
from kvstash.server.requestlog import log_fields
from kvstash.server.schemas import (
    ApiError,
    DocumentDeleted,
    DocumentInfo,
    DocumentRequest,
)
from kvstash.server.state import ClientGone, ServerState, next_event, submit


async def named_documents(st: ServerState, ids: list[str]) -> list[Document]:
    docs = []
    for i, doc_id in enumerate(ids):
        doc = await asyncio.to_thread(st.registry.get, doc_id) if valid_id(doc_id) else None
        if doc is None:
            raise ApiError(
                404,
                f"document {doc_id!r} not found; register it with POST /v1/documents",
                param=f"documents.{i}",
                code="document_not_found",
            )
        docs.append(doc)
    return docs


def _info(doc: Document) -> DocumentInfo:
    return DocumentInfo(id=doc.id, chunks=len(doc.chunks), tokens=doc.tokens, created=doc.created)


def _not_found(doc_id: str) -> ApiError:
    return ApiError(404, f"document {doc_id!r} not found", param="id", code="document_not_found")


class RegistryCollector:
    """The document registry's outage counters (:class:`RegistryCounts`; zeros without a shared registry)."""

    def __init__(self, registry: DocumentRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        counts = getattr(self.registry, "counts", None) or RegistryCounts()
        for name, value, help_ in (
            ("fallbacks", counts.fallbacks, "Document reads answered from this server's copy: shared registry down."),
            ("writebacks", counts.writebacks, "Documents the shared registry had lost, written back on use."),
            ("errors", counts.errors, "Shared document registry operations that failed or were skipped."),
            ("mirrored", counts.mirrored, "Documents other servers registered, copied into this server's copy."),
        ):
            yield CounterMetricFamily(f"kvstash_registry_{name}_total", help_, value=value)


def add_document_routes(app: FastAPI, st: ServerState) -> None:
    st.metrics.registry.register(RegistryCollector(st.registry))

    @app.post("/v1/documents")
    async def create_document(body: DocumentRequest, request: Request) -> DocumentInfo:
        if not body.text.strip():
            raise ApiError(400, "text is empty; send the document's text", param="text")
        text, size = body.text, st.config.chunk_tokens
        job = submit(st, lambda: st.worker.submit(lambda job: compute_document(st.engine, text, size)))
        try:
            kind, value = await next_event(job, request)
        except ClientGone:
            return Response(status_code=499)
        if kind == "error":
            raise job_error(value)
        await asyncio.to_thread(st.registry.put, value)
        log_fields(request, document=value.id, chunks=len(value.chunks), tokens=value.tokens)
        return _info(value)

    @app.get("/v1/documents/{doc_id}")
    async def get_document(doc_id: str) -> DocumentInfo:
        doc = await asyncio.to_thread(st.registry.get, doc_id) if valid_id(doc_id) else None
        if doc is None:
            raise _not_found(doc_id)
        return _info(doc)

    @app.delete("/v1/documents/{doc_id}")
    async def delete_document(doc_id: str) -> DocumentDeleted:
        if not (valid_id(doc_id) and await asyncio.to_thread(st.registry.delete, doc_id)):
            raise _not_found(doc_id)
        return DocumentDeleted(id=doc_id)
