"""Prompts as segments: each segment is tokenized on its own and placed in the model's chat template.

Layout (deterministic; the glue strings come from rendering the tokenizer's own chat template around
sentinel messages, so any Llama-family chat template works):

    [glue: before system] [system segment] [glue: system -> user] [document 1] ... [document N]
    [user segment] [glue: end of user turn + assistant header]

A document segment's text is ``text.strip() + "\\n\\n"``; it is tokenized alone, so its token ids are the
same wherever it is placed. This is what makes a chunk's KV reusable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SegmentKind = Literal["system", "document", "user", "glue"]
DEFAULT_SYSTEM = "You are a helpful assistant. Answer the question using the documents. Be brief."
_S, _U = "\x00kvstash-system\x00", "\x00kvstash-user\x00"


@dataclass(frozen=True)
class Segment:
    """A piece of the prompt the caller marks as a unit."""

    text: str
    kind: SegmentKind = "document"

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"segment text must be a str, got {type(self.text).__name__}")
        if self.kind not in ("system", "document", "user"):
            raise ValueError(f"segment kind must be 'system', 'document' or 'user', got {self.kind!r}")


@dataclass(frozen=True)
class PlannedSegment:
    kind: SegmentKind
    token_ids: tuple[int, ...]
    start: int  # position of its first token in the prompt

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def reusable(self) -> bool:
        """Documents and the system prompt are the units whose KV is cached and reused."""
        return self.kind in ("system", "document")


@dataclass(frozen=True)
class PromptPlan:
    segments: tuple[PlannedSegment, ...]
    token_ids: tuple[int, ...] = field(repr=False)

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class ChatGlue:
    """The template text around the system and user contents."""

    before_system: str
    system_to_user: str
    after_user: str

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatGlue:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; kvstash needs an instruction-tuned chat model")
        msgs = [{"role": "system", "content": _S}, {"role": "user", "content": _U}]
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            pre, rest = text.split(_S)
            mid, post = rest.split(_U)
            return cls(pre, mid, post)
        except Exception:  # templates without a system role: put it at the top of the user turn
            text = tokenizer.apply_chat_template(msgs[1:], tokenize=False, add_generation_prompt=True)
            pre, post = text.split(_U)
            return cls(pre, "\n\n", post)


def order_segments(segments: list[Segment]) -> list[Segment]:
    """System first (at most one; the default when none), then documents in order, then user text."""
    systems = [s for s in segments if s.kind == "system"]
    if len(systems) > 1:
        raise ValueError("a prompt takes at most one system segment; join them into one")
    users = [s for s in segments if s.kind == "user"]
    if not users:
        raise ValueError("a prompt needs a user segment (the question)")
    docs = [s for s in segments if s.kind == "document"]
    return [systems[0] if systems else Segment(DEFAULT_SYSTEM, "system"), *docs, *users]


class PromptBuilder:
    """Turns segments into a PromptPlan with one tokenization per segment (cached per text)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.glue = ChatGlue.from_tokenizer(tokenizer)
        self._cache: dict[tuple[str, str], tuple[int, ...]] = {}

    def tokenize(self, text: str, kind: SegmentKind) -> tuple[int, ...]:
        key = (kind, text)
        if key not in self._cache:
            body = text.strip() + "\n\n" if kind == "document" else text
            ids = tuple(self.tokenizer(body, add_special_tokens=False)["input_ids"])
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = ids
        return self._cache[key]

    def build(self, segments: list[Segment]) -> PromptPlan:
        ordered = order_segments(segments)
        users = [s for s in ordered if s.kind == "user"]
        pieces: list[tuple[SegmentKind, tuple[int, ...]]] = [
            ("glue", self.tokenize(self.glue.before_system, "glue")),
            ("system", self.tokenize(ordered[0].text, "system")),
            ("glue", self.tokenize(self.glue.system_to_user, "glue")),
        ]
        pieces += [("document", self.tokenize(s.text, "document")) for s in ordered if s.kind == "document"]
        pieces.append(("user", self.tokenize("\n\n".join(u.text for u in users), "user")))
        pieces.append(("glue", self.tokenize(self.glue.after_user, "glue")))
        planned, ids, pos = [], [], 0
        for kind, toks in pieces:
            if not toks:
                continue
            planned.append(PlannedSegment(kind, toks, pos))
            ids.extend(toks)
            pos += len(toks)
        return PromptPlan(tuple(planned), tuple(ids))
