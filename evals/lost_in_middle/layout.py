"""How lost-in-the-middle runs are compared cell by cell (evals.core.compare): a cell's coordinates and the
groups a regression is looked for in (every row is scored, controls included)."""

from __future__ import annotations

from evals.core.registry import Layout


def _groups(row: dict) -> list[str]:
    if row["task"] == "kv":
        return [f"kv pairs={row['k']}", f"kv position {row['position']} of {row['k']}"]
    if row["task"] == "rag":
        return [f"rag ordering {row['ordering']}"]
    if row["kind"] != "position":
        return [f"qa control {row['kind']}"]
    return [f"qa docs={row['k']}", f"qa position {row['position']} of {row['k']}"]


LAYOUT = Layout(("task", "qid", "item", "seed", "kind", "k", "position", "ordering"), lambda r: True, _groups)
