"""The stored record: one self-checking blob per chunk, identical in every tier, and the chunk key.

Layout (all integers little-endian)::

    magic      8 bytes   b"\\x89KVS\\r\\n\\x1a\\n"  (catches foreign files and text-mode mangling)
    version    u16       FORMAT_VERSION
    hdr_len    u32       length of the JSON header
    header     hdr_len   UTF-8 JSON: key, model, codec, dtype, shape, token_ids, positions, payload_nbytes
    payload    ...       the codec's bytes for K and V
    checksum   u64       xxh3_64 of every byte before it
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import xxhash

from kvstash.store.chunk import ChunkKV
from kvstash.store.codec_registry import get_codec

FORMAT_VERSION = 1
MAGIC = b"\x89KVS\r\n\x1a\n"
_PREFIX = struct.Struct("<8sHI")  # magic, version, header length
_CHECKSUM = struct.Struct("<Q")
_MIN_SIZE = _PREFIX.size + _CHECKSUM.size
PREFIX_SIZE = _PREFIX.size  # magic, version, header length: the bytes that say where the header ends


class CorruptRecord(ValueError):
    """A blob that is not a valid record for the key asked for. Tiers catch it and treat it as a miss.

    ``reason`` is one of: truncated, magic, version, checksum, header, key, payload.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"corrupt record ({reason}): {detail}")
        self.reason = reason


class Record(NamedTuple):
    """A decoded record: the chunk plus what it was stored under."""

    key: str
    model_fingerprint: str
    codec: str
    chunk: ChunkKV


def chunk_key(model_fingerprint: str, token_ids: Sequence[int], codec: str) -> str:
    """Stable hex key of a chunk: xxh3_128 over the model, codec, record format and token ids.

    The same inputs give the same key in every process and on every machine (no Python ``hash()``).
    """
    h = xxhash.xxh3_128()
    for text in ("kvstash-chunk", model_fingerprint, codec):
        raw = text.encode()
        h.update(struct.pack("<I", len(raw)) + raw)
    h.update(struct.pack("<IQ", FORMAT_VERSION, len(token_ids)))
    h.update(np.asarray(token_ids, dtype="<i8").tobytes())
    return h.hexdigest()


def encode_record(key: str, model_fingerprint: str, codec: str, chunk: ChunkKV) -> bytes:
    """Serialize ``chunk`` with ``codec`` into one checksummed blob. Pure."""
    shape = tuple(chunk.keys.shape)  # [layers, kv_heads, tokens, head_dim]
    payload = get_codec(codec).encode(chunk.keys, chunk.values)
    header = {
        "key": key,
        "model": model_fingerprint,
        "codec": codec,
        "dtype": str(chunk.keys.dtype).removeprefix("torch."),
        "shape": shape,
        "token_ids": [int(t) for t in chunk.token_ids],
        "positions": chunk.positions.tolist(),
        "payload_nbytes": len(payload),
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)), header_bytes, payload])
    return body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


def header_end(prefix: bytes | bytearray | memoryview) -> int | None:
    """Offset where the JSON header ends, from a record's first :data:`PREFIX_SIZE` bytes (or more); None if
    they are not the start of a record in this FORMAT_VERSION. Lets a scan read headers without payloads."""
    if len(prefix) < PREFIX_SIZE:
        return None
    magic, version, header_len = _PREFIX.unpack_from(prefix)
    if magic != MAGIC or version != FORMAT_VERSION:
        return None
    return PREFIX_SIZE + header_len


def decode_record(blob: bytes | bytearray | memoryview, expect_key: str | None = None) -> Record:
    """Check and decode a blob. Raises :class:`CorruptRecord` for anything but an intact record of
    ``expect_key`` (when given) in this FORMAT_VERSION. Tensors come back on the CPU in the stored dtype.
    """
    view = memoryview(blob).cast("B")
    if view.nbytes < _MIN_SIZE:
        raise CorruptRecord("truncated", f"{view.nbytes} bytes is shorter than any record")
    magic, version, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptRecord("magic", "not a kvstash record")
    if version != FORMAT_VERSION:
        raise CorruptRecord("version", f"format version {version}, this kvstash reads {FORMAT_VERSION}")
    body = view[: -_CHECKSUM.size]
    (stored_sum,) = _CHECKSUM.unpack_from(view, view.nbytes - _CHECKSUM.size)
    if xxhash.xxh3_64_intdigest(body) != stored_sum:
        raise CorruptRecord("checksum", "checksum mismatch (truncated or altered bytes)")
    header_end = _PREFIX.size + header_len
    header = _parse_header(body[_PREFIX.size : header_end])
    if expect_key is not None and header["key"] != expect_key:
        raise CorruptRecord("key", f"holds key {header['key']!r}, expected {expect_key!r}")
    return Record(header["key"], header["model"], header["codec"], _decode_chunk(header, body[header_end:]))


def _parse_header(raw: memoryview) -> dict:
    try:
        header = json.loads(bytes(raw))
        shape = tuple(int(d) for d in header["shape"])
        dtype = getattr(torch, header["dtype"])
        if len(shape) != 4 or not isinstance(dtype, torch.dtype):
            raise ValueError(f"bad shape {shape} or dtype {header['dtype']!r}")
        for field in ("key", "model", "codec", "token_ids", "positions", "payload_nbytes"):
            header[field]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CorruptRecord("header", f"unreadable header: {e}") from e
    header["shape"], header["dtype"] = shape, dtype
    return header


def _decode_chunk(header: dict, payload: memoryview) -> ChunkKV:
    shape, n = header["shape"], len(header["token_ids"])
    if payload.nbytes != header["payload_nbytes"] or shape[2] != n or len(header["positions"]) != n:
        raise CorruptRecord("payload", f"payload of {payload.nbytes} bytes does not match the header")
    try:
        keys, values = get_codec(header["codec"]).decode(payload, shape, header["dtype"])
    except ValueError as e:  # unknown codec or a payload of the wrong size
        raise CorruptRecord("payload", str(e)) from e
    positions = torch.tensor(header["positions"], dtype=torch.int64)
    return ChunkKV(token_ids=list(header["token_ids"]), keys=keys, values=values, positions=positions)
