"""Base vs adapter needle runs side by side, by length and depth (docs/lora.md, the worked example).

The regression gate (``python -m evals.regress``) tests groups (each length, each depth band); this table
shows every (length, depth) coordinate: cells found by the base and by the adapter, out of the seeds, and
what each said on the no-needle control cells.

    python benchmarks/lora_gate_table.py runs/lora/regress/base/niah runs/lora/regress/adapter/niah --out table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

COORDS = ["length", "depth", "seed"]


def rows(run: Path) -> pd.DataFrame:
    """The scored rows of a needle run directory (the last row of a cell wins, as on resume)."""
    lines = (run / "results.jsonl").read_text(encoding="utf-8").splitlines()
    frame = pd.DataFrame([json.loads(line) for line in lines if line.strip()])
    return frame.drop_duplicates("cell_id", keep="last")


def table(base: pd.DataFrame, adapter: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(needle cells by length x depth: found/seeds per side and the change, control answers per side)."""
    keep = [*COORDS, "kind", "found", "answer", "seconds"]
    both = base[keep].merge(adapter[keep], on=[*COORDS, "kind"], suffixes=("_base", "_adapter"), validate="1:1")
    needles = both[both["kind"] == "needle"]
    grid = needles.groupby(["length", "depth"]).agg(
        seeds=("seed", "count"), base=("found_base", "sum"), adapter=("found_adapter", "sum"),
        base_s=("seconds_base", "median"), adapter_s=("seconds_adapter", "median")).reset_index()
    grid["change"] = grid["adapter"] - grid["base"]
    controls = both[both["kind"] != "needle"][[*COORDS, "answer_base", "answer_adapter"]]
    return grid, controls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path, help="the base model's needle run directory")
    p.add_argument("adapter", type=Path, help="the adapter's needle run directory (same grid)")
    p.add_argument("--out", type=Path, help="markdown file to write (default: print)")
    args = p.parse_args()
    grid, controls = table(rows(args.base), rows(args.adapter))
    text = (f"Needle cells found, by length and depth ({args.base} vs {args.adapter}; seconds: median per cell)\n\n"
            f"```\n{grid.to_string(index=False)}\n```\n\n"
            f"Totals: base {grid['base'].sum()}/{grid['seeds'].sum()}, adapter {grid['adapter'].sum()}/"
            f"{grid['seeds'].sum()}\n\nControl cells (no needle in the haystack): the answers\n\n"
            f"```\n{controls.to_string(index=False)}\n```\n")
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
