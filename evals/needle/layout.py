"""The needle cell grid, and how needle runs are compared cell by cell (evals.core.compare): a cell's
coordinates, the scored cells (controls hold no needle), the groups a regression is looked for in, and the
cells a finished run holds."""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

from evals.core.registry import Layout
from evals.needle.haystack import run_haystack_sets


def grid(mode: str, genres: Iterable[str], lengths: Mapping[str, Sequence[int]] | Sequence[int],
         ) -> Iterator[tuple[str, str, int]]:
    """(genre, mode, length) of every block of needle cells, in run order: ``mode`` "both" is context then rag;
    ``lengths`` the same for every mode, or per mode (context lengths within the context window)."""
    modes = ("context", "rag") if mode == "both" else (mode,)
    for genre in genres:
        for m in modes:
            yield from ((genre, m, n) for n in (lengths[m] if isinstance(lengths, Mapping) else lengths))


def lengths_within(lengths: Sequence[int], window: float) -> dict[str, tuple[int, ...]]:
    """Lengths per mode: context mode runs those within the context window, rag mode all of them."""
    return {"context": tuple(n for n in lengths if n <= window), "rag": tuple(lengths)}


def length_label(n: int) -> str:
    """A prompt length as the flags write it: 4096 -> 4k (a length that is no multiple of 1024 as is)."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _band(depth: float) -> str:
    return "early (0-33%)" if depth < 100 / 3 else "middle (33-67%)" if depth <= 200 / 3 else "late (67-100%)"


def _groups(row: dict) -> list[str]:
    mode = "" if row["mode"] == "context" else f"{row['mode']} "
    return [f"{mode}length {length_label(row['length'])}", f"{mode}depth {_band(row['depth'])}",
            f"{mode}genre {row['genre']}"]


def _expected(meta: dict) -> set[tuple]:
    """The needle cells a finished run holds: modes x lengths (context: those within the window) x seeds x depths."""
    s: dict[str, Any] = meta.get("settings", {})
    lengths = lengths_within(s.get("lengths", ()), (meta.get("model") or {}).get("context_window") or float("inf"))
    return {(m, n, seed, float(d), s.get("needle"), "needle", g)
            for g, m, n in grid(s.get("mode"), run_haystack_sets(meta), lengths)
            for seed in s.get("seeds", ()) for d in s.get("depths", ())}


def _defaults(meta: dict) -> dict:
    """A row made before genres has its run's one haystack set as its genre."""
    return {"genre": next(iter(run_haystack_sets(meta)))}


LAYOUT = Layout(("mode", "length", "seed", "depth", "needle", "kind", "genre"),
                lambda r: r.get("kind") == "needle", _groups, _expected, _defaults)  # controls: no needle
