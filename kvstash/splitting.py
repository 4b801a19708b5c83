"""Text splitting: long texts cut into token-bounded chunks, each passed to the engine as one document segment.

A chunk's KV key is the chunk's document token ids (:meth:`kvstash.reuse.source.ChunkSource.ingest` stores
them ahead of time). Whoever asks about ingested text (the server, the benchmarks) passes the same chunks, from
:func:`split_text` with the same ``max_tokens``, as documents. A text that fits in ``max_tokens`` is one
chunk equal to the whole (stripped) text, so ``kvstash ask --doc FILE`` reuses a file ingested with a
chunk size larger than the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from kvstash.prompt import PromptBuilder

# Boundaries tried in order: paragraph breaks, sentence ends or line breaks, any whitespace. A chunk is
# always a slice of the original text (stripped), so packing pieces keeps the text's own separators.
_LEVELS = (re.compile(r"\n\s*\n"), re.compile(r"(?<=[.!?])\s+|\n"), re.compile(r"\s+"))


def split_text(text: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Split ``text`` into stripped chunks of at most ``max_tokens`` as measured by ``count_tokens``.

    Pieces are packed greedily in order. A chunk ends at a paragraph break unless a paragraph is longer
    than a chunk: then that paragraph is cut at sentence ends or line breaks, a sentence longer than a
    chunk between words, and an unbroken run longer than a chunk between characters. Each chunk is a
    slice of ``text``; the chunks are deterministic. A blank text gives no chunks.
    Raises ValueError if ``max_tokens`` < 1 or one character does not fit.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")

    def fits(piece: str) -> bool:
        return count_tokens(piece.strip()) <= max_tokens

    chunks: list[str] = []
    current = ""  # raw slice being filled; fits(current) holds
    for atom in _atoms(text.strip(), 0, fits):
        if fits(current + atom):
            current += atom
            continue
        if current.strip():
            chunks.append(current.strip())
        current = atom
    if current.strip():
        chunks.append(current.strip())
    return chunks


def _atoms(text: str, level: int, fits: Callable[[str], bool]) -> Iterator[str]:
    """Consecutive slices of ``text`` that each fit alone, cut at the coarsest boundaries that allow it."""
    if not text or fits(text):
        yield text
    elif level == len(_LEVELS):
        yield from _char_atoms(text, fits)
    else:
        for piece in _pieces(text, _LEVELS[level]):
            yield from _atoms(piece, level + 1, fits)


def _pieces(text: str, boundary: re.Pattern[str]) -> list[str]:
    """Consecutive slices of ``text`` that together are ``text``, each ending just after a boundary."""
    cuts = [m.end() for m in boundary.finditer(text) if 0 < m.end() < len(text)]
    edges = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


def _char_atoms(text: str, fits: Callable[[str], bool]) -> Iterator[str]:
    """Cut an unbroken run by characters: each piece is the longest prefix that fits (binary search)."""
    while text:
        lo, hi = 0, len(text)  # text[:lo] fits (or lo == 0); text[:hi + 1] does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(text[:mid]):
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            raise ValueError(f"max_tokens is too small to hold even one character of {text[:20]!r}")
        yield text[:lo]
        text = text[lo:]


def document_chunks(builder: PromptBuilder, text: str, max_tokens: int) -> list[str]:
    """:func:`split_text` measuring each chunk as the engine tokenizes a document segment."""
    return split_text(text, max_tokens, lambda t: len(builder.tokenize(t, "document")))
