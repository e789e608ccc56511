"""Haystacks: filler text by whole sentences, fitted to an exact token length with the model's own tokenizer.

The length budget is computed in ONE place, ``fit_prompt``: the target length of a cell is the length of the
final prompt the model sees (chat template + instructions + haystack + needle sentences + question + answer
prefix) plus the generation budget. Every prompt is described by a small ``Recipe`` (pool sentence ids,
needle slots) from which the exact prompt can be rebuilt later.

Where the haystack starts in the pool: ``fixed``, the first sentence, so every seed reads the same text; or
``seed``, a sentence drawn from the seed, so each seed reads its own text (RULER-style independent samples).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

from evals.core.errors import SettingsError
from evals.core.files import text_files

SUFFIXES = (".txt", ".md", ".rst")
# built-in haystack genres (corpora/, each folder with its NOTICE): name -> paths relative to the repository
GENRES: dict[str, tuple[str, ...]] = {
    "docs": ("corpora/sqlite", "corpora/python"),  # technical documentation (the default)
    "novels": ("corpora/austen",),  # narrative prose: two of Jane Austen's novels (public domain)
    "noise": ("corpora/noise",),  # content-free filler sentences (RULER's noise haystack)
}
DEFAULT_GENRE = "docs"
STARTS = ("fixed", "seed")
_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z\"'(\[])")


class Codec(Protocol):
    """How a model turns a user message into prompt text and token ids (see evals/core/targets.py)."""

    def render(self, user: str, answer_prefix: str = "") -> str:
        """The full prompt text: chat template around ``user``, generation prompt, then ``answer_prefix``."""

    def encode(self, text: str) -> list[int]:
        """Exactly the ids the model sees for a rendered prompt."""

    def encode_piece(self, text: str) -> list[int]:
        """Ids of a raw text piece (no special tokens), for estimates."""


def haystack_sets(items: Sequence[str] | str) -> dict[str, tuple[str, ...]]:
    """``--haystack`` items -> named sets of paths. An item is a genre name (GENRES), ``NAME=PATH[,PATH...]``,
    or a path; the bare paths together form one set, named after the genre whose paths they are and ``custom``
    otherwise (so ``--haystack corpora/sqlite corpora/python`` is the docs genre, as before)."""
    items = (items,) if isinstance(items, str) else tuple(items)
    sets: dict[str, tuple[str, ...]] = {}
    bare: list[str] = []
    for item in items:
        name, sep, paths = item.partition("=")
        if sep:
            if not name.isidentifier():
                raise SettingsError(f"--haystack {item!r}: a set's name must be a word (letters, digits, _), "
                                    "as in novels=path/to/books")
            new = {name: tuple(p for p in paths.split(",") if p)}
        elif item in GENRES:
            new = {item: GENRES[item]}
        else:
            bare.append(str(Path(item)))
            continue
        if set(new) & set(sets):
            raise SettingsError(f"--haystack names the set {next(iter(new))!r} twice; give each set once")
        sets.update(new)
    if bare:
        name = next((g for g, p in GENRES.items() if p == tuple(bare)), "custom")
        if name in sets:
            raise SettingsError(f"--haystack: the paths {bare} form the set {name!r}, which is also named; "
                                "give it once")
        sets = {name: tuple(bare), **sets}
    if not sets:
        raise SettingsError("--haystack is empty; give genre names (docs, novels, noise) or text files/folders")
    return sets


def run_haystack_sets(run: dict) -> dict[str, tuple[str, ...]]:
    """The haystack sets a run's run.json names (the default genre for a run made before ``--haystack``)."""
    return haystack_sets(run.get("settings", {}).get("haystack") or GENRES[DEFAULT_GENRE])


def split_sentences(text: str) -> list[str]:
    """Prose sentences of a text (whitespace collapsed; headings, code and fragments dropped)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(para.split())
        for s in _SPLIT.split(flat):
            s = s.strip()
            words = s.split()
            if 4 <= len(words) <= 80 and s[-1] in ".!?" and s[0].isupper() and sum(c.isalpha() for c in s) > len(s) / 2:
                out.append(s)
    return out


@dataclass(frozen=True)
class SentencePool:
    """All filler sentences of the haystack files, in file order, with a fingerprint of their text."""

    sentences: tuple[str, ...]
    files: tuple[str, ...]
    fingerprint: str

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path]) -> "SentencePool":
        files = text_files(paths, SUFFIXES, "haystack path {path!r} does not exist; give text files or folders of them")
        sentences: list[str] = []
        for f in files:
            sentences += split_sentences(f.read_text(encoding="utf-8", errors="replace"))
        if len(sentences) < 20:
            raise SettingsError(
                f"haystack {[str(p) for p in paths]} has only {len(sentences)} prose sentences; "
                "give text files with more prose (.txt, .md, .rst)")
        digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:16]
        return cls(tuple(sentences), tuple(str(f) for f in files), digest)


@dataclass(frozen=True)
class Frame:
    """The fixed parts of a prompt around the haystack."""

    instruction: str
    question: str
    answer_prefix: str = ""

    def user(self, context: str) -> str:
        return f"{self.instruction}\n\n{context}\n\n{self.question}"


@dataclass
class Recipe:
    """How to rebuild one prompt: pool sentence ids in order, and where each needle sentence goes.

    ``slots[j]`` is the number of haystack sentences before needle sentence j (None: not inserted).
    """

    pool_ids: list[int]
    slots: list[int | None] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"pool_ids": _ranges(self.pool_ids), "slots": self.slots}

    @classmethod
    def from_json(cls, data: dict) -> "Recipe":
        return cls([i for a, b in data["pool_ids"] for i in range(a, b)], list(data["slots"]))


@dataclass
class Built:
    """A rendered prompt and what was measured on it."""

    text: str
    ids: list[int]
    recipe: Recipe
    needle_offsets: list[int]  # token offset of each inserted needle sentence in the prompt
    haystack_span: tuple[int, int]  # token offsets where the haystack starts and ends

    def depth_percent(self, j: int = 0) -> float | None:
        """Where needle sentence j actually sits, in percent of the haystack's tokens."""
        if j >= len(self.needle_offsets):
            return None
        start, end = self.haystack_span
        return round(100 * (self.needle_offsets[j] - start) / max(1, end - start), 2)


def render(codec: Codec, pool: SentencePool, frame: Frame, needle: Sequence[str],
           recipe: Recipe) -> tuple[str, list[int], tuple[int, int]]:
    """Prompt text, the char index where each inserted needle sentence's piece starts (its separating space;
    -1: not inserted), and the haystack's char span."""
    sentences = [pool.sentences[i % len(pool.sentences)] for i in recipe.pool_ids]
    pieces: list[str] = []
    cuts: list[int] = [-1] * len(needle)
    slot_of = sorted((s, j) for j, s in enumerate(recipe.slots) if s is not None)
    k = pos = 0
    for i in range(len(sentences) + 1):
        while k < len(slot_of) and slot_of[k][0] == i:
            j = slot_of[k][1]
            cuts[j] = pos
            pos += len(needle[j]) + (1 if pieces else 0)
            pieces.append(needle[j])
            k += 1
        if i < len(sentences):
            pos += len(sentences[i]) + (1 if pieces else 0)
            pieces.append(sentences[i])
    haystack = " ".join(pieces)
    user = frame.user(haystack)
    text = codec.render(user, frame.answer_prefix)
    start = text.index(user) + len(frame.instruction) + 2
    return text, [start + c if c >= 0 else -1 for c in cuts], (start, start + len(haystack))


def start_sentence(how: str, seed: int, pool: SentencePool) -> int:
    """The pool sentence a haystack starts at: 0 for ``fixed``, one drawn deterministically from ``seed`` for
    ``seed`` (the fill wraps around the pool's end)."""
    if how not in STARTS:
        raise SettingsError(f"--haystack-start {how!r} is unknown; choose {' or '.join(STARTS)}")
    return 0 if how == "fixed" else random.Random(f"haystack:{seed}").randrange(len(pool.sentences))


def measure(codec: Codec, pool: SentencePool, frame: Frame, needle: Sequence[str], recipe: Recipe) -> Built:
    """Render a recipe and record its tokens, needle offsets and haystack span (all with the model tokenizer)."""
    text, cuts, (start, end) = render(codec, pool, frame, needle, recipe)
    offsets = [_offset(codec, text, c) for c in cuts if c >= 0]
    return Built(text, codec.encode(text), recipe, offsets, (_offset(codec, text, start), _offset(codec, text, end)))


def _offset(codec: Codec, text: str, char: int) -> int:
    """Token offset of a char position: the number of tokens of the prompt text before it."""
    return len(codec.encode(text[:char]))


def place(est: Sequence[int], depth: float) -> int:
    """The sentence boundary closest to ``depth`` percent of the haystack tokens (by estimated counts)."""
    total = sum(est)
    goal = total * depth / 100
    best, best_err, run = 0, abs(goal), 0
    for i, e in enumerate(est):
        run += e
        if abs(run - goal) < best_err:
            best, best_err = i + 1, abs(run - goal)
    return best


class Estimator:
    """Per-sentence token estimates (cached), used to fill greedily before the exact count fixes the tail."""

    def __init__(self, codec: Codec, pool: SentencePool):
        self.codec, self.pool = codec, pool
        self._cache: dict[int, int] = {}
        self._anchor = len(codec.encode_piece("Done."))

    def __call__(self, i: int) -> int:
        i %= len(self.pool.sentences)
        if i not in self._cache:
            self._cache[i] = len(self.codec.encode_piece("Done. " + self.pool.sentences[i])) - self._anchor
        return self._cache[i]


def fit_prompt(codec: Codec, pool: SentencePool, frame: Frame, needle: Sequence[str], depths: Sequence[float],
               length: int, max_new_tokens: int, est: Estimator | None = None, start: int = 0) -> Built:
    """THE length budget: a prompt of exactly ``length - max_new_tokens`` tokens with the needle sentences
    at ``depths`` (percent), filled by whole sentences from pool sentence ``start`` on (wrapping around the
    pool's end; recipe ids count on past it, so a recipe names its sentences in order).

    Greedy fill by estimates, then the exact token count of the rendered prompt drives changes at the tail of
    the haystack (append a sentence that fits the gap, drop the last one, or swap it for one of the right
    size). Raises SettingsError when the fixed parts alone exceed the budget.
    """
    est = est or Estimator(codec, pool)
    target = length - max_new_tokens
    empty = len(codec.encode(codec.render(frame.user(" ".join(needle)), frame.answer_prefix)))
    if empty > target:
        raise SettingsError(
            f"length {length} is too short: the template, instructions, needle and question alone take {empty} "
            f"tokens plus {max_new_tokens} for the answer; use a longer length")
    ids: list[int] = []
    budget = target - empty
    nxt = start
    while budget - est(nxt) >= 0:
        budget -= est(nxt)
        ids.append(nxt)
        nxt += 1
    tried: set[tuple[tuple[int, ...], int]] = set()
    overshot: set[int] = set()  # sentences that took more tokens in place than estimated: not picked again
    for _ in range(200):
        recipe = Recipe(list(ids), _slots([est(i) for i in ids], depths))
        n = len(codec.encode(render(codec, pool, frame, needle, recipe)[0]))
        gap = target - n
        if gap == 0:
            return measure(codec, pool, frame, needle, recipe)
        key = (tuple(ids), len(overshot))
        if key in tried:
            break
        tried.add(key)
        if gap < 0:
            overshot.add(ids.pop())
            continue
        used = set(ids) | overshot
        pick = _find(est, nxt, used, lambda e: e == gap)
        pick = pick if pick is not None else _find(est, nxt, used, lambda e: e < gap)
        if pick is not None:
            ids.append(pick)
            continue
        # the gap is smaller than every unused sentence: swap the last sentence for one that is `gap` longer
        last = ids[-1]
        swap = _find(est, nxt, used, lambda e: e == est(last) + gap)
        if swap is None:
            break
        ids[-1] = swap
    raise SettingsError(
        f"could not fit the haystack to exactly {target} prompt tokens with whole sentences of "
        f"{pool.files[:3]}...; add more haystack text (--haystack)")


def _find(est: Estimator, start: int, used: set[int], ok, span: int = 400) -> int | None:
    for i in range(start, start + span):
        if i not in used and 0 < est(i) and ok(est(i)):
            return i
    return None


def _slots(est: Sequence[int], depths: Sequence[float]) -> list[int | None]:
    return [place(est, d) for d in depths]


def _ranges(ids: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in ids:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out
