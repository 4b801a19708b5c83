"""Evaluation datasets: load the shared QA files into `Example`s with a controlled set of passages.

The data lives outside the repository (see ../shared/data/README.md); it is read in place, never copied.
Every loader is deterministic in ``seed``, and example i does not depend on ``n`` (loading 5 gives the
first 5 of loading 10).
"""

from __future__ import annotations

import functools
import gzip
import inspect
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstash.bench.metrics import contains_gold

DATA_ENV = "KVSTASH_DATA_DIR"
FILES = {
    "musique": "musique_s.json",
    "wikimqa": "wikimqa_s_clean.json",
    "nq": "nq_open_oracle.json",
    "squad": "squad_dev_v1.1.json",
    "kv": "kv-retrieval-75_keys.jsonl.gz",
    "needle": "musique_s.json",  # the haystack is real musique passages
    "needle-code": "musique_s.json",
    "chat": "nq_open_oracle.json",  # NQ-open questions asked with no documents
}
POSITIONS = ("random", "first", "middle", "last")
NEEDLE_NOUNS = (
    "falcon", "harbor", "lantern", "meadow", "orchid", "quartz", "saffron", "tundra", "violet", "walnut",
    "anchor", "beacon", "cobalt", "dolphin", "ember", "glacier", "hazel", "ivory", "juniper", "kestrel",
    "lotus", "maple", "nebula", "onyx", "pebble", "raven", "sequoia", "thistle", "umber", "willow",
    "acorn", "bramble", "cedar", "delta", "falconet", "garnet", "heron", "iris", "jasper", "kelp",
    "lichen", "marble", "nectar", "otter", "prairie", "quill", "reef", "sparrow", "topaz", "zephyr",
)  # fmt: skip


@dataclass
class Example:
    """One question with the passages the prompt is built from and the accepted answers."""

    id: str
    question: str  # plain question text; the engine adds the chat template
    documents: list[str]  # each passage as "Title\ntext", or just text when there is no title
    answers: list[str]  # any of these counts as correct
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. gold_index, depth, source row


# ---------------------------------------------------------------- files


def _candidate_dirs(data_dir: str | Path | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    if os.environ.get(DATA_ENV):
        return [Path(os.environ[DATA_ENV])]
    return [Path.cwd() / "../shared/data", Path(__file__).resolve().parents[2] / "../shared/data"]


def data_file(filename: str, data_dir: str | Path | None = None) -> Path:
    """Path of a data file: ``data_dir``, else $KVSTASH_DATA_DIR, else ../shared/data (cwd, then repo root).

    Raises FileNotFoundError naming every path tried and how to point at the data.
    """
    tried = [(d / filename).resolve() for d in _candidate_dirs(data_dir)]
    for path in tried:
        if path.is_file():
            return path
    where = " or ".join(str(p) for p in tried)
    raise FileNotFoundError(
        f"dataset file not found: expected {where}. Pass --data-dir (data_dir=...) or set {DATA_ENV} "
        f"to the folder holding {filename} (see ../shared/data/README.md)."
    )


@functools.cache
def _read(path: Path) -> Any:
    """Parsed contents of a .json or .jsonl.gz file, cached per path; callers must not mutate it."""
    if path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with path.open(encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------- shared helpers


def _doc(title: str, text: str) -> str:
    return f"{title}\n{text}" if title else text


def _count(n: int | None, available: int, name: str) -> int:
    if n is None:
        return available
    if not 0 <= n <= available:
        raise ValueError(f"{name}: n={n} is out of range; this dataset has {available} examples")
    return n


def _check_passages(passages: int, most: int, name: str) -> None:
    if not 1 <= passages <= most:
        raise ValueError(f"{name}: passages={passages} must be between 1 and {most}")


def _gold_index(gold_position: int | str, passages: int, rng: random.Random) -> int:
    """Index of the gold passage among ``passages``: an int (negative counts from the end) or a name."""
    if isinstance(gold_position, int) and not isinstance(gold_position, bool):
        if not -passages <= gold_position < passages:
            raise ValueError(f"gold_position={gold_position} is outside 0..{passages - 1}")
        return gold_position % passages
    named = {"first": 0, "middle": passages // 2, "last": passages - 1}
    if gold_position == "random":
        return rng.randrange(passages)
    if gold_position in named:
        return named[gold_position]
    raise ValueError(f"gold_position={gold_position!r}: use an int index or one of {', '.join(POSITIONS)}")


def _distractors(rng: random.Random, pool: Sequence[str], k: int, reject: Callable[[int], bool]) -> list[str]:
    """k distinct passages drawn from pool, skipping indices that ``reject`` and repeated texts."""
    chosen: list[str] = []
    seen: set[str] = set()
    for _ in range(50 * k + 100):  # bounded so a too-strict filter fails loudly instead of spinning
        if len(chosen) == k:
            return chosen
        i = rng.randrange(len(pool))
        if pool[i] in seen or reject(i):
            continue
        seen.add(pool[i])
        chosen.append(pool[i])
    if len(chosen) < k:
        raise ValueError(f"found only {len(chosen)} of {k} distractor passages; ask for fewer passages")
    return chosen


def _rng(seed: int, name: str, key: object) -> random.Random:
    # A string seed is hashed deterministically (sha512), unlike hash() of a str.
    return random.Random(f"{seed}:{name}:{key}")


# ---------------------------------------------------------------- loaders


def _load_normalized(name: str, path: Path, n: int | None, passages: int, seed: int) -> list[Example]:
    rows = _read(path)
    _check_passages(passages, min(len(r["ctxs"]) for r in rows), name)
    return [
        Example(
            id=r["id"],
            question=r["question"].strip(),
            documents=[_doc(c["title"], c["text"]) for c in r["ctxs"][:passages]],
            answers=list(r["answers"]),
            meta={"source": r.get("source", name)},
        )
        for r in rows[: _count(n, len(rows), name)]
    ]


def _load_musique(path: Path, n: int | None, passages: int, seed: int) -> list[Example]:
    return _load_normalized("musique", path, n, passages, seed)


def _load_wikimqa(path: Path, n: int | None, passages: int, seed: int) -> list[Example]:
    return _load_normalized("wikimqa", path, n, passages, seed)


def _load_nq(path: Path, n: int | None, passages: int, seed: int, gold_position: int | str = "random") -> list[Example]:
    """Gold passage of each NQ-open row among ``passages - 1`` other rows' passages."""
    rows = _read(path)
    _check_passages(passages, len(rows), "nq")
    pool = [_doc(r["ctxs"][0]["title"], r["ctxs"][0]["text"]) for r in rows]
    out = []
    for row_i, r in enumerate(rows[: _count(n, len(rows), "nq")]):
        rng = _rng(seed, "nq", r["id"])
        gold = pool[row_i]
        answers = list(r["answers"])

        def reject(i: int, gold: str = gold, answers: list[str] = answers) -> bool:
            return pool[i] == gold or contains_gold(pool[i], answers)

        docs = _distractors(rng, pool, passages - 1, reject)
        idx = _gold_index(gold_position, passages, rng)
        docs.insert(idx, gold)
        out.append(Example(r["id"], r["question"].strip(), docs, answers, {"gold_index": idx}))
    return out


def _load_squad(
    path: Path, n: int | None, passages: int, seed: int, gold_position: int | str = "random"
) -> list[Example]:
    """A seeded sample of SQuAD questions, each with its paragraph among other articles' paragraphs."""
    articles = _read(path)["data"]
    pool, pool_article, questions = [], [], []
    for a_i, article in enumerate(articles):
        title = article["title"].replace("_", " ")
        for para in article["paragraphs"]:
            questions.extend((a_i, len(pool), qa) for qa in para["qas"])
            pool.append(_doc(title, para["context"]))
            pool_article.append(a_i)
    _check_passages(passages, len(pool), "squad")
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)  # a full shuffle keeps the first n stable as n grows
    out = []
    for q_i in order[: _count(n, len(questions), "squad")]:
        a_i, p_i, qa = questions[q_i]
        answers = list(dict.fromkeys(a["text"] for a in qa["answers"]))
        rng = _rng(seed, "squad", qa["id"])

        def reject(i: int, a_i: int = a_i, answers: list[str] = answers) -> bool:
            return pool_article[i] == a_i or contains_gold(pool[i], answers)

        docs = _distractors(rng, pool, passages - 1, reject)
        idx = _gold_index(gold_position, passages, rng)
        docs.insert(idx, pool[p_i])
        out.append(Example(qa["id"], " ".join(qa["question"].split()), docs, answers, {"gold_index": idx}))
    return out


def _bounds(length: int, parts: int) -> list[int]:
    """Edges of contiguous, near-equal slices (the first ``length % parts`` one longer), as array_split."""
    size, extra = divmod(length, parts)
    return [i * size + min(i, extra) for i in range(parts + 1)]


def _load_kv(
    path: Path, n: int | None, passages: int, seed: int, gold_position: int | str | None = None
) -> list[Example]:
    """Key-value retrieval: the records split over ``passages`` JSON documents; ask one key's value.

    gold_position None keeps the file's record order; otherwise the gold record moves to the middle of
    the requested document.
    """
    rows = _read(path)
    out = []
    for row_i, r in enumerate(rows[: _count(n, len(rows), "kv")]):
        records = [tuple(kv) for kv in r["ordered_kv_records"]]
        _check_passages(passages, len(records), "kv")
        bounds = _bounds(len(records), passages)
        gold = (r["key"], r["value"])
        if gold_position is not None:
            target = _gold_index(gold_position, passages, _rng(seed, "kv", row_i))
            lo, hi = bounds[target], bounds[target + 1]
            records.remove(gold)
            records.insert(lo + (hi - lo - 1) // 2, gold)
        slices = [records[bounds[j] : bounds[j + 1]] for j in range(passages)]
        idx = next(j for j, s in enumerate(slices) if gold in s)
        docs = [json.dumps(dict(s), ensure_ascii=False) for s in slices]
        question = f'What is the value associated with the key "{r["key"]}"?'
        meta = {"gold_index": idx, "key": r["key"]}
        out.append(Example(f"kv_{row_i}", question, docs, [r["value"]], meta))
    return out


def _insert_at_sentence(text: str, needle: str, frac: float) -> tuple[str, int]:
    """Insert needle at the sentence boundary nearest ``frac`` of the text; returns (text, offset)."""
    bounds = [0] + [i + 2 for i in range(len(text) - 1) if text[i : i + 2] == ". "] + [len(text)]
    at = min(bounds, key=lambda b: abs(b - frac * len(text)))
    if at == len(text):
        head = text.rstrip()
        return f"{head} {needle}", len(head) + 1
    return f"{text[:at]}{needle} {text[at:]}", at


NEEDLE_ASK = "Reply with the six-digit number."  # needle-code's instruction after the question


HAYSTACKS = ("musique", "wikimqa", "squad")  # passage pools a needle can hide in


def _load_needle(
    path: Path, n: int | None, passages: int, seed: int, depth: float | str = "random", haystack: str = "musique"
) -> list[Example]:
    """A generated fact hidden at ``depth`` (0 = first sentence, 1 = last) in real passages of ``haystack``
    (musique by default; wikimqa or squad paragraphs for prompts unlike the ones a method was tuned on)."""
    return _needles(path, n, passages, seed, depth, "needle", "", haystack)


def _load_needle_code(
    path: Path, n: int | None, passages: int, seed: int, depth: float | str = "random", haystack: str = "musique"
):
    """The needle prompts (same passages, codes and depths per seed) with the question followed by
    :data:`NEEDLE_ASK`. With full prefill (6 passages, seed 0) SmolLM2-135M finds the code in 6 of the first 20
    bare needle prompts (it often calls it "a code of conduct") and in 15 of the same 20 with the instruction."""
    return _needles(path, n, passages, seed, depth, "needle-code", NEEDLE_ASK, haystack)


def _haystack(path: Path, haystack: str, name: str) -> list[str]:
    """Every passage of the ``haystack`` file (beside ``path``, the musique file) as a document."""
    if haystack not in HAYSTACKS:
        raise ValueError(f"{name}: haystack={haystack!r}; choose one of: {', '.join(HAYSTACKS)}")
    rows = _read(path.parent / FILES[haystack])
    if haystack == "squad":
        return [_doc(a["title"].replace("_", " "), p["context"]) for a in rows["data"] for p in a["paragraphs"]]
    return list(dict.fromkeys(_doc(c["title"], c["text"]) for r in rows for c in r["ctxs"]))


def _needles(path: Path, n, passages: int, seed: int, depth, name: str, ask: str, haystack: str) -> list[Example]:
    """Needle examples named ``{name}_{seed}_{i}`` (``{name}-{haystack}_...`` outside musique); ``ask`` (an
    instruction, or "") follows the question."""
    if n is None or n < 0:
        raise ValueError(f"{name}: n={n}; pass n >= 0, the number of examples to generate")
    if not (depth == "random" or (isinstance(depth, int | float) and 0.0 <= depth <= 1.0)):
        raise ValueError(f"{name}: depth={depth!r} must be a number in [0, 1] or 'random'")
    if haystack == "musique":  # as before: every passage, repeats included, so old prompts stay the same
        pool = [_doc(c["title"], c["text"]) for r in _read(path) for c in r["ctxs"]]
    else:
        pool, name = _haystack(path, haystack, name), f"{name}-{haystack}"
    _check_passages(passages, len(pool), name)
    out = []
    for i in range(n):
        rng = _rng(seed, "needle", i)  # keyed on "needle": needle-code has the same passages and codes
        noun = rng.choice(NEEDLE_NOUNS)
        code = str(rng.randint(100_000, 999_999))
        needle = f"The secret code of the {noun} project is {code}."
        docs = [pool[j] for j in rng.sample(range(len(pool)), passages)]
        d = rng.random() if depth == "random" else float(depth)
        idx = min(int(d * passages), passages - 1)
        docs[idx], offset = _insert_at_sentence(docs[idx], needle, d * passages - idx)
        meta = {"gold_index": idx, "depth": d, "needle": needle, "offset": offset}
        question = f"What is the secret code of the {noun} project?" + (f" {ask}" if ask else "")
        out.append(Example(f"{name}_{seed}_{i}", question, docs, [code], meta))
    return out


def _load_chat(path: Path, n: int | None, passages: int, seed: int) -> list[Example]:
    """NQ-open questions with no documents at all: plain chat, where nothing in the prompt can be copied
    (``passages`` is ignored)."""
    rows = _read(path)
    rng = _rng(seed, "chat", len(rows))
    order = rng.sample(range(len(rows)), _count(n, len(rows), "chat"))
    return [Example(rows[i]["id"], rows[i]["question"].strip() + "?", [], list(rows[i]["answers"])) for i in order]


LOADERS: dict[str, Callable[..., list[Example]]] = {
    "musique": _load_musique,
    "wikimqa": _load_wikimqa,
    "nq": _load_nq,
    "squad": _load_squad,
    "kv": _load_kv,
    "needle": _load_needle,
    "needle-code": _load_needle_code,
    "chat": _load_chat,
}


def dataset_options(name: str) -> list[str]:
    """The extra keyword options ``load_dataset`` accepts for ``name``."""
    params = list(inspect.signature(_loader(name)).parameters)
    return params[4:]  # after path, n, passages, seed


def _loader(name: str) -> Callable[..., list[Example]]:
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(LOADERS)}")
    return LOADERS[name]


def load_dataset(
    name: str,
    *,
    n: int | None = None,
    passages: int = 10,
    seed: int = 0,
    data_dir: str | Path | None = None,
    **opts: Any,
) -> list[Example]:
    """Load ``n`` examples (all when None; needle requires n) of dataset ``name`` with ``passages`` each.

    opts: nq/squad/kv take ``gold_position`` (int index, "random", "first", "middle", "last"; kv defaults
    to the file's order), needle and needle-code take ``depth`` (float in [0, 1] or "random").
    Raises ValueError for an unknown name/option or out-of-range arguments, FileNotFoundError when the
    data file is missing. Reads are cached per file; the returned examples are fresh objects.
    """
    loader = _loader(name)
    unknown = sorted(set(opts) - set(dataset_options(name)))
    if unknown:
        allowed = ", ".join(dataset_options(name)) or "none"
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; allowed: {allowed}")
    return loader(data_file(FILES[name], data_dir), n, passages, seed, **opts)
