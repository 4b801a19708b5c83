"""Text splitting: paragraphs first, then sentences, words, characters."""

from __future__ import annotations

import pytest

from kvstash.splitting import split_text
from tests.redis_server import (
    redis_url,  # noqa: F401
)


def test_split_text_prefers_paragraphs_then_sentences() -> None:
    words = lambda t: len(t.split())  # noqa: E731 - a stand-in tokenizer: one token per word
    text = "One two three. Four five.\n\nSix seven. Eight nine ten eleven twelve thirteen fourteen.\n\nFifteen."
    assert split_text(text, 100, words) == [text]
    assert split_text(text, 5, words) == [
        "One two three. Four five.",
        "Six seven. Eight nine ten",
        "eleven twelve thirteen fourteen.\n\nFifteen.",
    ]
    assert split_text(text, 12, words) == [
        "One two three. Four five.",  # a paragraph that fits is not split to fill the chunk before it
        "Six seven. Eight nine ten eleven twelve thirteen fourteen.\n\nFifteen.",
    ]
    chunks = split_text(text, 3, words)
    assert all(words(c) <= 3 for c in chunks) and " ".join(chunks).split() == text.split()
    assert split_text("abcdefg", 3, len) == ["abc", "def", "g"]
    assert split_text("  \n ", 3, len) == []
    with pytest.raises(ValueError, match="max_tokens"):
        split_text("text", 0, len)
