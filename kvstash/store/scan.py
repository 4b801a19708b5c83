"""What a tier holds, from the records themselves: entries, bytes and tokens per codec, read from record
headers only (never payloads), so ``store stats`` in a fresh process sees what every process wrote.

A tier reads each record's first :data:`PREFIX_SIZE` bytes, then up to :func:`header_end` (the JSON header),
and hands :func:`summarize` ``(record size, parse_head(those bytes))`` per record. See :mod:`kvstash.store.record`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from kvstash.store.record import PREFIX_SIZE, header_end

__all__ = ["PREFIX_SIZE", "CodecUsage", "HeadInfo", "Usage", "header_end", "parse_head", "summarize"]


FAST_READ = 512  # bytes of a header that usually hold everything a scan needs (a long model name needs more)
_HEADER_START = re.compile(
    rb'\{"key":"[0-9A-Za-z_-]*","model":"(?P<model>(?:[^"\\]|\\.)*)","codec":"(?P<codec>[0-9A-Za-z_.-]+)",'
    rb'"dtype":"[0-9a-z_]+","shape":\[\d+,\d+,(?P<tokens>\d+),\d+\],"token_ids":\['
)


class HeadInfo(NamedTuple):
    codec: str
    model: str
    tokens: int


@dataclass(frozen=True)
class CodecUsage:
    """Records of one codec in one tier."""

    entries: int
    bytes: int
    tokens: int
    bytes_per_token: float


@dataclass(frozen=True)
class Usage:
    """What a tier holds now. ``unreadable`` records count in entries and bytes but have no tokens."""

    entries: int = 0
    bytes: int = 0
    tokens: int = 0
    unreadable: int = 0  # records whose header is damaged or foreign (``verify`` removes them)
    codecs: dict[str, CodecUsage] = field(default_factory=dict)

    @property
    def bytes_per_token(self) -> float:
        readable = sum(c.bytes for c in self.codecs.values())
        return readable / self.tokens if self.tokens else 0.0


def parse_head(head: bytes | bytearray | memoryview) -> HeadInfo | None:
    """Codec, model and token count from a record's first bytes; None if they are not readable.

    The header's start as :func:`~kvstash.store.record.encode_record` writes it (key, model, codec, dtype,
    shape, in that order) is enough, so a scan reads a few hundred bytes of a record; any other header is
    parsed whole and needs all of it (the checksum is not checked: that needs the payload; ``verify`` does).
    """
    end = header_end(head)
    if end is None:
        return None
    fast = _HEADER_START.match(bytes(head[PREFIX_SIZE : PREFIX_SIZE + FAST_READ]))
    if fast is not None:
        model = json.loads(b'"' + fast["model"] + b'"')
        return HeadInfo(fast["codec"].decode(), model, int(fast["tokens"]))
    if len(head) < end:
        return None
    try:
        header = json.loads(bytes(head[PREFIX_SIZE:end]))
        return HeadInfo(str(header["codec"]), str(header["model"]), len(header["token_ids"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def summarize(records: Iterable[tuple[int, HeadInfo | None]]) -> Usage:
    """Totals over records given as ``(size in bytes, parse_head(...))``; None counts as unreadable."""
    per: dict[str, list[int]] = {}  # codec -> [entries, bytes, tokens]
    entries = nbytes = unreadable = 0
    for size, info in records:
        entries += 1
        nbytes += size
        if info is None:
            unreadable += 1
            continue
        acc = per.setdefault(info.codec, [0, 0, 0])
        acc[0], acc[1], acc[2] = acc[0] + 1, acc[1] + size, acc[2] + info.tokens
    codecs = {c: CodecUsage(e, b, t, b / t if t else 0.0) for c, (e, b, t) in sorted(per.items())}
    return Usage(entries, nbytes, sum(c.tokens for c in codecs.values()), unreadable, codecs)
