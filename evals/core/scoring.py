"""Scoring: normalized, word-bounded substring match of expected values; Wilson intervals for rates."""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Iterable

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NOT_WORD = re.compile(r"[^0-9a-z\-]+")
_LOOSE_HYPHEN = re.compile(r"(?<![0-9a-z])-|-(?![0-9a-z])")


def normalize(text: str) -> str:
    """Lower case, Unicode NFKC, thousands commas dropped, punctuation -> space (hyphens inside words kept)."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = _DIGIT_COMMA.sub("", t)
    t = _NOT_WORD.sub(" ", t)
    t = _LOOSE_HYPHEN.sub(" ", t)
    return " ".join(t.split())


def contains_value(answer: str, value: str) -> bool:
    """True when ``value`` occurs in ``answer`` as whole words: '7342' is not found in '73421'."""
    v = normalize(value)
    if not v:
        return False
    return re.search(rf"(?<![0-9a-z]){re.escape(v)}(?![0-9a-z])", normalize(answer)) is not None


def value_fraction(answer: str, expected: Iterable[str]) -> float:
    """Fraction of expected values found in the answer (1.0 = all of them)."""
    values = list(expected)
    return sum(contains_value(answer, v) for v in values) / len(values) if values else 0.0


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
