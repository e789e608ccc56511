"""Report helpers every suite uses: the rate table (found/n, rate, Wilson interval, mean score per group)."""

from __future__ import annotations

import pandas as pd

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
