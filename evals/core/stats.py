"""Paired significance tests for suites that score the same items under two conditions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of two conditions on the same items (correct / wrong per item)."""

    n: int  # items scored under both conditions
    a_only: int  # right under A, wrong under B
    b_only: int  # wrong under A, right under B
    p_value: float  # two-sided exact binomial p of the discordant pairs


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """Exact (binomial) McNemar test: under H0 each discordant item is equally likely to favour A or B."""
    from scipy.stats import binomtest

    if len(a) != len(b):
        raise ValueError(f"paired test needs the same items under both conditions ({len(a)} != {len(b)})")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(binomtest(a_only, discordant, 0.5).pvalue)
    return McNemar(len(a), a_only, b_only, min(1.0, p))


def min_flagged_drop(n: int, alpha: float, min_drop: float = 0.0) -> int | None:
    """The fewest pass -> fail cells (and no fail -> pass) among ``n`` paired cells that the exact McNemar test
    flags at ``alpha`` with a pass-rate drop of at least ``min_drop``: the smallest drop the grid can detect.
    None when not even all ``n`` cells failing would be flagged."""
    b = 1
    while b <= n and mcnemar_exact([True] * b, [False] * b).p_value >= alpha:
        b += 1
    while b <= n and b / n < min_drop:
        b += 1
    return b if b <= n else None


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the order given (family-wise error over all of them)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    out = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        out[i] = running
    return out
