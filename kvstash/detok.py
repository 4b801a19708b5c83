"""Incremental detokenization with stop strings: turns generated token ids into safe text deltas."""

from __future__ import annotations


class TextStream:
    """Accumulates token ids and yields text deltas that will never be retracted.

    A delta holds back (a) an incomplete UTF-8 character and (b) any tail that could be the start of a stop
    string, so streaming and non-streaming output are identical.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # final text so far (stop string excluded once hit)
        self.emitted = 0  # chars of self.text already returned
        self.stopped = False

    def _holdback(self, text: str) -> int:
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    longest = max(longest, k)
                    break
        return longest

    def push(self, token_id: int) -> str:
        """Add a token; returns the new text that is safe to show (maybe ""). Sets ``stopped`` on a stop string."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = text[: min(hits)]
            return self._take(len(self.text))
        self.text = text
        return self._take(len(text) - self._holdback(text))

    def flush(self) -> str:
        """At the end of generation: whatever was held back."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
