"""The stored record: one self-checking blob per chunk, identical in every tier, and the chunk key.

Layout, format version 2 (all integers little-endian)::

    magic      8 bytes   b"\\x89KVS\\r\\n\\x1a\\n"  (catches foreign files and text-mode mangling)
    version    u16       FORMAT_VERSION
    hdr_len    u32       length of the JSON header
    header     hdr_len   UTF-8 JSON: key, model, codec, dtype, shape, token_ids, positions, payload_nbytes,
                         layer_nbytes, layer_sums (xxh3_64 of each layer block, 16 hex digits: records of
                         one shape and codec have one size)
    head_sum   u64       xxh3_64 of magic .. header: the header can be trusted without reading the payload
    payload    L blocks  block l = the codec's bytes for layer l (K then V), each layer_nbytes long
    checksum   u64       xxh3_64 of every byte before it

A whole read checks ``checksum``; a layer-at-a-time read (:mod:`kvstash.store.layers`) checks ``head_sum``
once and ``layer_sums[l]`` per block, so layer 0 can be used while the later blocks are still being read.
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
from kvstash.store.codec import Shape4
from kvstash.store.codec_registry import get_codec

FORMAT_VERSION = 2
MAGIC = b"\x89KVS\r\n\x1a\n"
_PREFIX = struct.Struct("<8sHI")  # magic, version, header length
_SUM = struct.Struct("<Q")  # head_sum and the closing checksum
_MIN_SIZE = _PREFIX.size + 2 * _SUM.size
PREFIX_SIZE = _PREFIX.size  # magic, version, header length: the bytes that say where the header ends
CHECKSUM_SIZE = _SUM.size  # the closing whole-record checksum


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


class RecordHeader(NamedTuple):
    """A record's checked header: what it holds and where each layer block lies."""

    key: str
    model: str  # model fingerprint
    codec: str
    dtype: torch.dtype  # dtype the tensors are decoded to
    shape: Shape4  # [layers, kv_heads, tokens, head_dim]
    token_ids: list[int]
    positions: list[int]
    payload_nbytes: int  # layers * layer_nbytes
    layer_nbytes: int  # bytes of one layer block
    layer_sums: list[int]  # xxh3_64 of each layer block
    payload_offset: int  # where block 0 starts in the record (after the header and head_sum)


class HeadParse(NamedTuple):
    """What :func:`parse_record_head` made of a record's first bytes."""

    header: RecordHeader | None  # None: ``missing`` more bytes are needed first
    missing: int  # bytes to read after the ones given before the header can be parsed; 0 once parsed


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
    """Serialize ``chunk`` with ``codec`` into one checksummed blob of per-layer blocks. Pure."""
    shape = tuple(chunk.keys.shape)  # [layers, kv_heads, tokens, head_dim]
    enc = get_codec(codec)
    blocks = [enc.encode(chunk.keys[i : i + 1], chunk.values[i : i + 1]) for i in range(shape[0])]
    layer_nbytes = enc.encoded_nbytes((1, *shape[1:]))
    assert all(len(b) == layer_nbytes for b in blocks), (codec, shape, layer_nbytes)
    header = {
        "key": key,
        "model": model_fingerprint,
        "codec": codec,
        "dtype": str(chunk.keys.dtype).removeprefix("torch."),
        "shape": shape,
        "token_ids": [int(t) for t in chunk.token_ids],
        "positions": chunk.positions.tolist(),
        "payload_nbytes": layer_nbytes * shape[0],
        "layer_nbytes": layer_nbytes,
        "layer_sums": [xxhash.xxh3_64_hexdigest(b) for b in blocks],
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes
    body = b"".join([head, _SUM.pack(xxhash.xxh3_64_intdigest(head)), *blocks])
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body))


def header_end(prefix: bytes | bytearray | memoryview) -> int | None:
    """Offset where the JSON header ends, from a record's first :data:`PREFIX_SIZE` bytes (or more); None if
    they are not the start of a record in this FORMAT_VERSION. Lets a scan read headers without payloads."""
    if len(prefix) < PREFIX_SIZE:
        return None
    magic, version, header_len = _PREFIX.unpack_from(prefix)
    if magic != MAGIC or version != FORMAT_VERSION:
        return None
    return PREFIX_SIZE + header_len


def parse_record_head(head: bytes | bytearray | memoryview) -> HeadParse:
    """Check and parse the header from a record's first bytes (any number of them). Pure.

    Returns the header once ``head`` holds all of it (magic .. head_sum), else how many bytes are missing.
    Raises :class:`CorruptRecord` for a foreign blob, another format version, a header that fails its
    ``head_sum``, or a header whose layout does not add up.
    """
    view = memoryview(head).cast("B")
    if view.nbytes < PREFIX_SIZE:
        return HeadParse(None, PREFIX_SIZE - view.nbytes)
    magic, version, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptRecord("magic", "not a kvstash record")
    if version != FORMAT_VERSION:
        raise CorruptRecord("version", f"format version {version}, this kvstash reads {FORMAT_VERSION}")
    end = PREFIX_SIZE + header_len
    payload_offset = end + _SUM.size
    if view.nbytes < payload_offset:
        return HeadParse(None, payload_offset - view.nbytes)
    (head_sum,) = _SUM.unpack_from(view, end)
    if xxhash.xxh3_64_intdigest(view[:end]) != head_sum:
        raise CorruptRecord("checksum", "header checksum mismatch (altered header bytes)")
    return HeadParse(_parse_header(view[PREFIX_SIZE:end], payload_offset), 0)


def layer_range(header: RecordHeader, layer: int) -> tuple[int, int]:
    """(offset, length) of layer ``layer``'s block in the record. ValueError for a layer it does not have."""
    layers = header.shape[0]
    if not 0 <= layer < layers:
        raise ValueError(f"layer {layer} is out of range: the record has {layers} layers (0..{layers - 1})")
    return header.payload_offset + layer * header.layer_nbytes, header.layer_nbytes


def decode_layer(
    header: RecordHeader, layer: int, block: bytes | bytearray | memoryview
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check block ``layer`` against ``header.layer_sums`` and decode it to (k, v), each
    [kv_heads, tokens, head_dim] in ``header.dtype`` on the CPU. Raises :class:`CorruptRecord` ("checksum")."""
    layer_range(header, layer)  # ValueError for a layer the record does not have
    view = memoryview(block).cast("B")
    if view.nbytes != header.layer_nbytes:
        raise CorruptRecord("truncated", f"layer {layer} block is {view.nbytes} bytes, expected {header.layer_nbytes}")
    if xxhash.xxh3_64_intdigest(view) != header.layer_sums[layer]:
        raise CorruptRecord("checksum", f"layer {layer} checksum mismatch (altered bytes)")
    _, kv_heads, tokens, head_dim = header.shape
    k, v = get_codec(header.codec).decode(view, (1, kv_heads, tokens, head_dim), header.dtype)
    return k[0], v[0]  # [kv_heads, tokens, head_dim] each


def check_checksum(blob: bytes | bytearray | memoryview) -> None:
    """Raise :class:`CorruptRecord` ("truncated" or "checksum") unless the closing checksum matches."""
    view = memoryview(blob).cast("B")
    if view.nbytes < _MIN_SIZE:
        raise CorruptRecord("truncated", f"{view.nbytes} bytes is shorter than any record")
    (stored_sum,) = _SUM.unpack_from(view, view.nbytes - _SUM.size)
    if xxhash.xxh3_64_intdigest(view[: -_SUM.size]) != stored_sum:
        raise CorruptRecord("checksum", "checksum mismatch (truncated or altered bytes)")


def decode_record(blob: bytes | bytearray | memoryview, expect_key: str | None = None) -> Record:
    """Check and decode a blob. Raises :class:`CorruptRecord` for anything but an intact record of
    ``expect_key`` (when given) in this FORMAT_VERSION. Tensors come back on the CPU in the stored dtype.
    """
    view = memoryview(blob).cast("B")
    if view.nbytes < _MIN_SIZE:
        raise CorruptRecord("truncated", f"{view.nbytes} bytes is shorter than any record")
    parse_record_head(view[:PREFIX_SIZE])  # magic and version first: they say more than a checksum would
    check_checksum(view)
    header = parse_record_head(view).header
    if header is None:  # the checksum held, so the header length itself was written wrong
        raise CorruptRecord("header", "the header runs past the end of the record")
    if expect_key is not None and header.key != expect_key:
        raise CorruptRecord("key", f"holds key {header.key!r}, expected {expect_key!r}")
    return Record(header.key, header.model, header.codec, _decode_chunk(header, view))


def _parse_header(raw: memoryview, payload_offset: int) -> RecordHeader:
    try:
        h = json.loads(bytes(raw))
        shape = tuple(int(d) for d in h["shape"])
        dtype = getattr(torch, h["dtype"])
        if len(shape) != 4 or not isinstance(dtype, torch.dtype):
            raise ValueError(f"bad shape {shape} or dtype {h['dtype']!r}")
        sums = [int(x, 16) for x in h["layer_sums"]]
        fields = ("key", "model", "codec", "token_ids", "positions", "payload_nbytes", "layer_nbytes")
        header = RecordHeader(**{f: h[f] for f in fields}, dtype=dtype, shape=shape, layer_sums=sums,
                              payload_offset=payload_offset)  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CorruptRecord("header", f"unreadable header: {e}") from e
    _check_layout(header)
    return header


def _check_layout(h: RecordHeader) -> None:
    """The header's sizes agree with each other and with its codec; CorruptRecord("payload") if not."""
    layers, kv_heads, tokens, head_dim = h.shape
    n = len(h.token_ids)
    try:
        expected = get_codec(h.codec).encoded_nbytes((1, kv_heads, tokens, head_dim))
    except ValueError as e:  # an unknown codec
        raise CorruptRecord("payload", str(e)) from e
    if (
        (tokens, len(h.positions), len(h.layer_sums)) != (n, n, layers)
        or h.layer_nbytes != expected
        or (h.payload_nbytes != layers * h.layer_nbytes)
    ):
        raise CorruptRecord("payload", f"header sizes do not add up for shape {h.shape} and codec {h.codec}")


def _decode_chunk(header: RecordHeader, view: memoryview) -> ChunkKV:
    end = header.payload_offset + header.payload_nbytes
    if view.nbytes != end + _SUM.size:
        raise CorruptRecord("payload", f"payload of {view.nbytes - _SUM.size - header.payload_offset} bytes does "
                            f"not match the header's {header.payload_nbytes}")  # fmt: skip
    keys = torch.empty(header.shape, dtype=header.dtype)  # [layers, kv_heads, tokens, head_dim]
    values = torch.empty(header.shape, dtype=header.dtype)
    for layer in range(header.shape[0]):
        offset, length = layer_range(header, layer)
        keys[layer], values[layer] = decode_layer(header, layer, view[offset : offset + length])
    positions = torch.tensor(header.positions, dtype=torch.int64)
    return ChunkKV(token_ids=list(header.token_ids), keys=keys, values=values, positions=positions)
