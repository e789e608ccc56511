"""The regression history: one row per (run, suite entry), Parquet or CSV by extension, and a trend plot.

A rerun of the same run id replaces its rows instead of adding new ones, so a same-day rerun of a
scheduled job is idempotent. The table is rewritten atomically (temp file + rename).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from evals.core.compare import Comparison
from evals.core.errors import SettingsError
from evals.core.scoring import wilson
from evals.core.portable import portable_path

KEY = ("run_id", "entry")


def rows(results: list[Comparison], run_id: str, date: str, first: bool = False) -> list[dict[str, Any]]:
    """History rows of one regression run (the candidate's overall pass rate and the verdict).

    ``first``: the run that became the first baseline (``results`` compare it with itself): status
    "baseline", no baseline rate and no test.
    """
    out = []
    for r in results:
        s, g = r.cand_meta.get("settings", {}), r.overall
        git = r.cand_meta.get("git") or {}
        n, passed = (g.n, g.cand_pass) if g else (0, 0)
        lo, hi = wilson(passed, n)
        out.append({
            "date": date, "run_id": run_id, "entry": r.entry, "suite": r.suite,
            "model": s.get("model"), "quant": s.get("quant"), "git_commit": git.get("commit"),
            "git_dirty": git.get("dirty"), "n": n, "passed": passed, "pass_rate": passed / n if n else None,
            "ci_low": lo if n else None, "ci_high": hi if n else None,
            "baseline_pass_rate": g.base_pass / n if g and n and not first else None,
            "p_value": g.p_value if g and not first else None, "regression": r.regression and not first,
            "improvement": r.improvement and not first, "status": "baseline" if first and not r.invalid else r.status,
            "reason": r.invalid or "", "candidate": portable_path(r.candidate),
            "baseline": "" if first else portable_path(r.baseline),
        })
    return out


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame()
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def append(path: str | Path, new: list[dict[str, Any]]) -> pd.DataFrame:
    """Add ``new`` rows to the table at ``path``, replacing rows of the same run id and entry."""
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise SettingsError(f"--history {str(path)!r}: use a .parquet or .csv file name")
    old = _read(path)
    fresh = pd.DataFrame(new)
    if not old.empty:
        replaced = old.set_index(list(KEY)).index.isin(fresh.set_index(list(KEY)).index)
        old = old[~replaced]
    table = pd.concat([old, fresh], ignore_index=True) if not old.empty else fresh
    table = table.sort_values(["date", "run_id", "entry"], kind="stable").reset_index(drop=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        table.to_parquet(tmp, index=False)
    else:
        table.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return table


def plot(table: pd.DataFrame, out: str | Path) -> Path:
    """Pass rate over time per entry/model/quant with Wilson intervals; regressions marked red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    data = table[table["n"] > 0]
    for (entry, model, quant), g in data.groupby(["entry", "model", "quant"], dropna=False, sort=True):
        x = pd.to_datetime(g["date"])
        y = g["pass_rate"].astype(float)
        err = [(y - g["ci_low"].astype(float)).clip(lower=0), (g["ci_high"].astype(float) - y).clip(lower=0)]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{entry} · {model} · {quant}")
        bad = g["regression"].astype(bool)
        ax.scatter(x[bad], y[bad], color="red", marker="X", s=90, zorder=5)
    if data["regression"].astype(bool).any():
        ax.scatter([], [], color="red", marker="X", s=90, label="regression")
    dates = pd.to_datetime(data["date"])
    if not dates.empty:
        ax.set_xlim(dates.min() - pd.Timedelta(days=2), dates.max() + pd.Timedelta(days=2))
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("pass rate (95% Wilson)")
    ax.set_title("evals.regress history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.autofmt_xdate()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
