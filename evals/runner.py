"""The one runner of every suite: cells -> prompts -> model -> score -> store, with a progress bar.

A suite says which cells exist, how cells group (cells of a group share a prompt prefix), how to build a
group's prompts, and how to score an answer. The runner skips finished cells, decodes each group with
prefix-cache reuse, and appends one row per cell as soon as it is scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Hashable, Protocol, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from evals.decode import GreedyDecoder
from evals.spec import Cell
from evals.store import RunDir


@dataclass
class Job:
    """A cell ready to decode: its prompt ids and the row fields known before decoding."""

    cell: Cell
    ids: list[int]
    row: dict[str, Any]
    payload: Any = None  # suite data the scorer needs (e.g. the needle)


@dataclass
class Group:
    jobs: list[Job]
    base: list[int] | None = None  # a prompt every job shares a prefix with (None: no sharing)


class Suite(Protocol):
    name: str
    max_new_tokens: int

    def cells(self) -> list[Cell]: ...

    def group_key(self, cell: Cell) -> Hashable: ...

    def prepare(self, cells: Sequence[Cell]) -> Group: ...

    def score(self, job: Job, answer: str) -> dict[str, Any]: ...


@dataclass
class RunStats:
    cells: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)


def progress_columns() -> tuple:
    """The progress bar of every run: cells done of total, prompt tokens per second, elapsed, ETA."""
    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("cells · {task.fields[tps]} tok/s · elapsed"), TimeElapsedColumn(),
            TextColumn("· ETA"), TimeRemainingColumn())


def run(suite: Suite, target: Any, run_dir: RunDir, done: dict[str, dict], *, show_progress: bool = True,
        concurrency: int = 1, batch_size: int | None = None) -> RunStats:
    """Run every cell of ``suite`` not in ``done``; rows are appended to ``run_dir`` as they finish.

    A served target (``--backend openai``) goes through evals.concurrent, ``concurrency`` requests at a time.
    An in-process one decodes ``batch_size`` cells of a group together (None: evals.decode's device default).
    """
    if target.served:
        from evals.concurrent import run_concurrent

        return run_concurrent(suite, target, run_dir, done, concurrency=concurrency, show_progress=show_progress)
    todo = [c for c in suite.cells() if c.cell_id not in done]
    groups: dict[Hashable, list[Cell]] = {}
    for c in todo:
        groups.setdefault(suite.group_key(c), []).append(c)
    decoder = GreedyDecoder(target.model, target.eos_ids, suite.max_new_tokens, batch_size=batch_size)
    stats = RunStats()
    t_start = time.perf_counter()
    with Progress(*progress_columns(), disable=not show_progress, transient=False) as progress:
        bar = progress.add_task(suite.name, total=len(todo), tps="-")
        for cells in groups.values():
            group = suite.prepare(cells)
            for d in decoder.run_group([j.ids for j in group.jobs], group.base):
                job = group.jobs[d.index]
                answer = target.decode(d.new_ids)
                row = dict(job.row)
                row.update(answer=answer, answer_tokens=len(d.new_ids), reused_tokens=d.reused_tokens,
                           computed_tokens=d.computed_tokens, seconds=round(d.seconds, 3))
                row.update(suite.score(job, answer))
                run_dir.append(row)
                stats.rows.append(row)
                stats.cells += 1
                stats.prompt_tokens += len(job.ids)
                stats.computed_tokens += d.computed_tokens
                stats.seconds = time.perf_counter() - t_start
                progress.update(bar, advance=1, tps=f"{stats.prompt_tokens / max(stats.seconds, 1e-9):,.0f}")
    return stats
