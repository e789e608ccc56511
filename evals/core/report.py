"""Report helpers every suite uses: the rate table (found/n, rate, Wilson interval, mean score per group), a
rate as text, the code and scoring lines of a report's header."""

from __future__ import annotations

import pandas as pd

from evals.core.scorers import scorer_of
from evals.core.scoring import wilson


def rate_table(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """found/n, rate, Wilson 95% interval and mean score per group (the metric every suite reports)."""
    g = df.groupby(by, dropna=False, sort=True)
    out = g.agg(n=("found", "size"), found=("found", "sum"), mean_score=("score", "mean")).reset_index()
    out["found"] = out["found"].astype(int)
    out["rate"] = out["found"] / out["n"]
    ci = [wilson(k, n) for k, n in zip(out["found"], out["n"])]
    out["ci_low"] = [round(a, 4) for a, _ in ci]
    out["ci_high"] = [round(b, 4) for _, b in ci]
    return out


def rate_text(k: int, n: int) -> str:
    """``k`` of ``n`` as every report writes a rate: ``12/15 = 80% (95% CI 55–93%)`` (Wilson interval)."""
    if not n:
        return "0/0"
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {k / n:.0%} (95% CI {100 * lo:.0f}–{100 * hi:.0f}%)"


def code_line(git: dict) -> str:
    """The code's commit as run.json records it, saying so when it is unknown or its dirty flag is."""
    if not git.get("commit"):
        return "git commit unknown (not run from a checkout)"
    dirty = {True: " (dirty)", False: "", None: " (dirty: unknown)"}[git.get("dirty")]
    return f"git {git['commit'][:10]}{dirty}"


def scoring_line(df: pd.DataFrame, nd: pd.DataFrame) -> str:
    """Which scorer counted ``found`` in the rows ``df``, and what the other one says about the scored cells ``nd``."""
    used = sorted({scorer_of(r) for r in df.to_dict("records")})
    line = f"- **Scoring**: {', '.join(f'`{u}`' for u in used)}"
    if len(used) > 1:
        line += " (**mixed**: re-score the run with `--rescore RUN --scorer NAME`)"
    if {"found_strict", "found_lenient"} <= set(nd.columns) and len(nd):
        strict, lenient = nd["found_strict"].astype(bool), nd["found_lenient"].astype(bool)
        line += (f"; strict (committed, not hedged or negated, no other value claimed) finds "
                 f"{int(strict.sum())}/{len(nd)}, lenient (value anywhere in the answer, as NIAH v2 and RULER "
                 f"count) {int(lenient.sum())}/{len(nd)}; **{int((strict != lenient).sum())} cells differ**")
    return line


JSON_COLUMNS = ("json_parses", "json_valid", "json_only", "found")


def json_table(df: pd.DataFrame, by: list[str]) -> list[str]:
    """JSON answers side by side (markdown rows): per group of ``by``, each decoding's counts of answers holding a
    JSON object / valid against the schema / only the object / found (strict, on the object's fields)."""
    decs = list(dict.fromkeys(df["decoding"]))
    head = " | ".join(f"{d}: parses / valid / only object / found" for d in decs)
    lines = [f"| {' | '.join(by)} | {head} |", "|" + "---|" * (len(by) + len(decs))]
    for key, d in df.groupby(by, sort=True, dropna=False):
        counts = [" / ".join(f"{int(g[c].astype(bool).sum())}/{len(g)}" for c in JSON_COLUMNS)
                  for g in (d[d["decoding"] == dec] for dec in decs)]
        shown = ["-" if pd.isna(k) else f"{k:g}" if isinstance(k, float) else str(k)
                 for k in (key if isinstance(key, tuple) else (key,))]
        lines.append(f"| {' | '.join(shown)} | {' | '.join(counts)} |")
    return lines
