"""A draft tree: proposed continuations of a sequence, verified by the model in one forward.

Row 0 of a verification pass is the sequence's pending token (sampled, not yet fed); rows 1..T are the
tree's nodes in depth-first order, the first branch first, so that when the first branch is accepted its KV
already sits in order right after the pending token. A node at depth d (1 for a child of the pending token)
goes at position ``p + d`` and attends to the cached tokens, the pending token and its own ancestors only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    """Nodes in depth-first order: ``tokens[i]`` proposed after ``parents[i]`` (-1: after the pending token)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int) -> int:
        """Append a node (its parent must already be in the tree); returns its index."""
        assert parent < len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        return len(self.tokens) - 1

    def depths(self) -> list[int]:
        """Depth of every node: 1 for children of the pending token."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def children(self, node: int) -> dict[int, int]:
        """Token -> node index of the children of ``node`` (-1: of the pending token), in tree order."""
        return {t: i for i, (t, p) in enumerate(zip(self.tokens, self.parents, strict=True)) if p == node}

    def visibility(self) -> torch.Tensor:
        """[T+1, T+1] bool over the pass's rows (0 = pending token, i+1 = node i): row a may attend to row b iff b
        is a itself or one of its ancestors (the pending token is everyone's ancestor)."""
        n = len(self.tokens) + 1
        vis = torch.eye(n, dtype=torch.bool)
        vis[:, 0] = True
        for i, p in enumerate(self.parents):
            vis[i + 1] |= vis[p + 1] if p >= 0 else vis[0]
        return vis
