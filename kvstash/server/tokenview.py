"""The token view of one chat: the prompt's segments as token strings, which tokens were computed in this
request, and (after blend's probe) how much the question attended to each token.

A request asks for it with ``"token_view": true``; it comes back in the response's ``kvstash.token_view``, one
entry per segment of the prompt, in order::

    {"kind": "document", "document": "doc-...", "chunk": 0, "tokens": ["The", " secret", ...],
     "recomputed": [0, 7, 12], "reused": 41, "tier": "ram", "focus": [1.0, 0.02, ...]}

``recomputed`` holds the offsets (within the segment) of the tokens whose KV this request computed: every token
of a segment computed in full (``full``, the question, template glue, a chunk the store missed), none of a
chunk reused as it was (``naive``), blend's chosen tokens of a reused chunk. ``focus`` (only after blend's probe)
is the question's attention on each token, scaled so that the most-attended reused token is 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvstash.prompt import PromptPlan
from kvstash.reuse.report import PrefillReport


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text, such that the pieces join into the text of ``ids``. A character whose bytes span several
    tokens is shown on the last of them (the others get "")."""
    pieces: list[str] = []
    start = 0  # the first token whose text is not in ``pieces`` yet
    for i in range(len(ids)):
        context = list(ids[max(0, start - 1) : start])  # one token before, so a leading space decodes as it does
        before = tokenizer.decode(context) if context else ""
        text = tokenizer.decode([*context, *ids[start : i + 1]])
        if text.endswith("\ufffd") and i + 1 < len(ids):  # a character not complete yet
            pieces.append("")
            continue
        pieces.append(text[len(before) :] if text.startswith(before) else tokenizer.decode(list(ids[start : i + 1])))
        start = i + 1
    return pieces


def token_view(tokenizer, plan: PromptPlan, report: PrefillReport, documents: Sequence[tuple[str, int]]) -> list[dict]:
    """The view described in the module docstring. ``documents`` names the prompt's document segments in order,
    as (document id, chunk index)."""
    focus = None
    if report.focus is not None:
        top = float(report.focus.max())
        focus = (report.focus / top if top > 0 else report.focus).clamp(0, 1)
    names = iter(documents)
    out = []
    for i, (seg, row) in enumerate(zip(plan.segments, report.segments, strict=True)):
        entry: dict = {"kind": seg.kind}
        if seg.kind == "document" and (name := next(names, None)) is not None:
            entry["document"], entry["chunk"] = name
        entry["tokens"] = token_pieces(tokenizer, seg.token_ids)
        entry["recomputed"] = report.recomputed_offsets(i)
        entry["reused"], entry["tier"] = row.reused, row.tier
        if focus is not None:
            entry["focus"] = [round(x, 3) for x in focus[seg.start : seg.end].tolist()]
        out.append(entry)
    return out
