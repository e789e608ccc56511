"""Scoring primitives: Unicode-aware normalization, whole-word matching of expected values (lenient), the
strict checks (committed, not negated, not hedged, no other value of the needle's kind), Wilson intervals.

The recorded scorers built from these (name + version in every row, re-runnable with ``--rescore``) are in
``evals/scorers.py``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LOOSE_HYPHEN = re.compile(r"(?<![^\s-])-+|-+(?![^\s-])")
_KEEP = ("L", "N", "M")  # letters, digits and combining marks of every script


def normalize(text: str) -> str:
    """Unicode NFKC, case folded, thousands commas dropped, everything but letters, digits and marks of any
    script -> space (hyphens inside words kept, so UUIDs and ``lucky-ember`` survive)."""
    t = _DIGIT_COMMA.sub("", unicodedata.normalize("NFKC", text).casefold())
    t = "".join(c if c == "-" or unicodedata.category(c)[0] in _KEEP else " " for c in t)
    return " ".join(_LOOSE_HYPHEN.sub(" ", t).split())


def _word(value: str) -> re.Pattern[str]:
    """``value`` (normalized) as whole words of a normalized text: only spaces, hyphens or the ends around it."""
    return re.compile(rf"(?<![^\s-]){re.escape(value)}(?![^\s-])")


def contains_value(answer: str, value: str) -> bool:
    """True when ``value`` occurs in ``answer`` as whole words: '7342' is not found in '73421'."""
    v = normalize(value)
    return bool(v) and _word(v).search(normalize(answer)) is not None


def value_fraction(answer: str, expected: Iterable[str]) -> float:
    """Fraction of expected values found in the answer (1.0 = all of them)."""
    values = list(expected)
    return sum(contains_value(answer, v) for v in values) / len(values) if values else 0.0


# ---------------------------------------------------------------- strict: the answer commits to the values

_CLAUSE = re.compile(r"[.!?;:,]+(?=\s|$)|[\n|]+|\s(?:or|but|and)\s")
NEGATORS = frozenset("not no never neither nor cannot without".split())  # ('none' is a value in code answers)
HEDGES = frozenset("maybe perhaps possibly probably might likely unsure uncertain unclear guess either".split())


@dataclass(frozen=True)
class ValueKind:
    """What counts as a value of a needle's kind in an answer: words matching a regex (numbers of at least
    two digits, UUIDs) or words of a closed vocabulary (the value words, the character names)."""

    name: str
    pattern: str | None = None
    vocabulary: frozenset[str] = frozenset()

    def values_in(self, normalized: str) -> set[str]:
        """The words of ``normalized`` that are values of this kind ('20-bit' is a word, not the number 20)."""
        words = normalized.split()
        if self.pattern is not None:
            return {w for w in words if re.fullmatch(self.pattern, w)}
        return {w for w in words if w in self.vocabulary}


NUMBER = ValueKind("number", r"\d{2,}")
UUID = ValueKind("uuid", r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ANY = ValueKind("any")  # no kind: nothing else counts as a competing value


@dataclass(frozen=True)
class Clause:
    """One clause of an answer (split at . ! ? ; : , newlines, table bars and 'or'/'but'/'and'), normalized."""

    text: str
    negated: bool
    hedged: bool


def clauses(answer: str, norm: Callable[[str], str] = normalize) -> list[Clause]:
    """The answer's clauses, normalized by ``norm``, each with its negation and hedge flags (n't negates)."""
    flat = _DIGIT_COMMA.sub("", unicodedata.normalize("NFKC", answer))
    out = []
    for piece in _CLAUSE.split(flat):
        words = norm(piece).split()
        if not words:
            continue
        nt = any(w == "t" and i and words[i - 1].endswith("n") for i, w in enumerate(words))
        out.append(Clause(" ".join(words), nt or any(w in NEGATORS for w in words),
                          any(w in HEDGES for w in words)))
    return out


@dataclass(frozen=True)
class StrictMatch:
    """Which expected values the answer commits to, and which other values of the kind it claims."""

    committed: tuple[str, ...]
    negated: tuple[str, ...]
    hedged: tuple[str, ...]
    others: tuple[str, ...]
    expected: int

    @property
    def score(self) -> float:
        """Committed values over expected plus competing values: 'maybe 57318 or 12345' scores 0.5."""
        return len(self.committed) / (self.expected + len(self.others)) if self.expected else 0.0

    @property
    def found(self) -> bool:
        return self.expected > 0 and len(self.committed) == self.expected and not self.others


def strict_match(answer: str, expected: Sequence[str], kind: ValueKind = ANY,
                 norm: Callable[[str], str] = normalize) -> StrictMatch:
    """An expected value is committed when a clause states it and that clause is neither negated nor hedged;
    a value of ``kind`` that is not expected counts against the answer when a clause that is not negated
    states it ('The passcode is 57318, not 12345.' commits to 57318 and claims nothing else)."""
    parts = clauses(answer, norm)
    values = [norm(v) for v in expected]
    committed, negated, hedged = [], [], []
    for v in values:
        where = [c for c in parts if _word(v).search(c.text)]
        if any(not c.negated and not c.hedged for c in where):
            committed.append(v)
        elif any(c.negated for c in where):
            negated.append(v)
        elif where:
            hedged.append(v)
    claimed = {x for c in parts if not c.negated for x in kind.values_in(c.text)}
    if parts and not answer.rstrip().endswith((".", "!", "?")):  # cut by the token budget: a last value that
        last = parts[-1].text.split()[-1]  # starts an expected one is that value, unfinished
        if any(v.startswith(last) and v != last for v in values):
            claimed.discard(last)
    others = sorted(claimed - set(values))
    return StrictMatch(tuple(committed), tuple(negated), tuple(hedged), tuple(others), len(values))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a rate k/n (95% by default); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_APOSTROPHES = re.compile("['\u2018\u2019\u02bc]")


def normalize_squad(text: str) -> str:
    """SQuAD answer normalization: NFKC, lower case, apostrophes dropped, other punctuation and symbols -> space,
    articles (a, an, the) dropped."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = _APOSTROPHES.sub("", t)
    t = "".join(" " if unicodedata.category(c).startswith(("P", "S")) else c for c in t)
    return " ".join(_ARTICLES.sub(" ", t).split())


def answer_match(answer: str, golds: Iterable[str]) -> bool:
    """True when any gold answer occurs in ``answer`` as whole words after SQuAD normalization (the
    lost-in-the-middle metric; word-bounded, so '10' is not found in '100')."""
    a = f" {normalize_squad(answer)} "
    return any(g and f" {g} " in a for g in (normalize_squad(x) for x in golds))
