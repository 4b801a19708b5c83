"""Drafters: where proposed continuations come from. ``ngram`` looks them up in the sequence itself (the
prompt's documents and the answer so far), as prompt-lookup decoding does; a small draft model can be added
as another :class:`Drafter`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from typing import ClassVar

from kvstash.speculate.tree import DraftTree


class Drafter(ABC):
    """Proposes continuations for one sequence. ``extend`` feeds it the sequence's new tokens (the prompt at
    first, then each token of the answer); ``propose`` returns a tree of at most ``nodes`` tokens, ``depth``
    deep, continuing the sequence so far (empty when it has nothing to offer)."""

    name: ClassVar[str]

    @abstractmethod
    def extend(self, tokens: Sequence[int]) -> None: ...

    @abstractmethod
    def propose(self, depth: int, nodes: int) -> DraftTree: ...


class NgramDrafter(Drafter):
    """Prompt lookup as a tree: the last ``n`` tokens (longest n first, ``max_n`` down to ``min_n``) are looked up
    wherever they occurred before in the sequence; what followed each earlier occurrence, most recent first, is
    a branch, and branches that start alike share their nodes."""

    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 2, branches: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes must satisfy 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n, self.branches = max_n, min_n, branches
        self.context: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = defaultdict(list)  # n-gram -> positions of its last token

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.context.append(int(t))
            i = len(self.context) - 1
            for n in range(1, self.max_n + 1):
                if i + 1 >= n:
                    self.ends[tuple(self.context[i + 1 - n : i + 1])].append(i)

    def continuations(self, depth: int) -> list[list[int]]:
        """What followed earlier occurrences of the sequence's last tokens: longest matches first, then the most
        recent; at most ``branches`` distinct ones, each up to ``depth`` tokens."""
        last = len(self.context) - 1
        found: list[list[int]] = []
        for n in range(min(self.max_n, len(self.context)), self.min_n - 1, -1):
            for end in reversed(self.ends.get(tuple(self.context[last + 1 - n :]), ())):
                if end >= last:
                    continue  # the suffix itself
                cont = self.context[end + 1 : end + 1 + depth]
                if cont and cont not in found:
                    found.append(cont)
                    if len(found) == self.branches:
                        return found
        return found

    def propose(self, depth: int, nodes: int) -> DraftTree:
        tree = DraftTree()
        for cont in self.continuations(depth):
            parent = -1
            for token in cont:
                child = tree.children(parent).get(token)
                if child is None:
                    if len(tree) >= nodes:
                        return tree
                    child = tree.add(token, parent)
                parent = child
        return tree


DRAFTERS: dict[str, type[Drafter]] = {NgramDrafter.name: NgramDrafter}
