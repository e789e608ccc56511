"""The one runner of every suite: cells -> prompts -> model -> score -> store, with a progress bar.

A suite says which cells exist, how cells group (cells of a group share a prompt prefix), how to build a
group's prompts, and how to score an answer. The runner skips finished cells, decodes each group with
prefix-cache reuse, and appends one row per cell as soon as it is scored.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Hashable, Protocol, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from evals.core.decode import GreedyDecoder
from evals.core.spec import Cell
from evals.core.store import RunDir, append_jsonl
from evals.core.targets import CELL_ERRORS  # recorded per cell; any other error stops the run


@dataclass
class Job:
    """A cell ready to decode: its prompt ids and the row fields known before decoding."""

    cell: Cell
    ids: list[int]
    row: dict[str, Any]
    payload: Any = None  # suite data the scorer needs (e.g. the needle)
    schema: dict[str, Any] | None = None  # a JSON schema the answer is decoded under (--constrained); None: free


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
    """Totals of a run. ``computed_tokens``: prompt tokens the model was fed (each shared-prefix token once, on
    the cell that first needed it), which the progress bar's tok/s counts; ``prompt_tokens``: the cells' lengths."""

    cells: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)

    def add(self, row: dict, prompt_tokens: int, computed_tokens: int) -> None:
        """Count one stored row."""
        self.rows.append(row)
        self.cells += 1
        self.prompt_tokens += prompt_tokens
        self.computed_tokens += computed_tokens

    def tick(self, progress: Progress, bar: Any, t_start: float) -> None:
        """Advance the progress bar by one cell, with the computed prompt tokens per second so far."""
        self.seconds = time.perf_counter() - t_start
        progress.update(bar, advance=1, tps=f"{self.computed_tokens / max(self.seconds, 1e-9):,.0f}")


def todo_groups(suite: Suite, done: dict[str, dict]) -> tuple[int, list[list[Cell]]]:
    """(number of cells to run, those cells by ``suite.group_key``, in cell order); finished cells are skipped."""
    groups: dict[Hashable, list[Cell]] = {}
    for c in suite.cells():
        if c.cell_id not in done:
            groups.setdefault(suite.group_key(c), []).append(c)
    return sum(map(len, groups.values())), list(groups.values())


def progress_columns() -> tuple:
    """The progress bar of every run: cells done of total, computed prompt tokens per second, elapsed, ETA."""
    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("cells · {task.fields[tps]} tok/s · elapsed"), TimeElapsedColumn(),
            TextColumn("· ETA"), TimeRemainingColumn())


def run(suite: Suite, target: Any, run_dir: RunDir, done: dict[str, dict], *, show_progress: bool = True,
        concurrency: int = 1, batch_size: int | None = None, prefill_chunk: int | None = None) -> RunStats:
    """Run every cell of ``suite`` not in ``done``; rows are appended to ``run_dir`` as they finish.

    A served target (``--backend openai``) goes through :func:`run_concurrent`, ``concurrency`` requests at a time.
    An in-process one decodes ``batch_size`` cells of a group together and prefills ``prefill_chunk`` tokens per
    forward call (None: evals.core.decode's defaults for the model's device). On CUDA each row records
    ``gpu_peak_bytes``: the peak memory allocated on the model's (first) GPU since its group started, so a
    group's last row holds the group's peak (weights + KV cache + activations).
    """
    if target.served:
        return run_concurrent(suite, target, run_dir, done, concurrency=concurrency, show_progress=show_progress)
    n_todo, groups = todo_groups(suite, done)
    decoder = GreedyDecoder(target.model, target.eos_ids, suite.max_new_tokens, batch_size=batch_size,
                            prefill_chunk=prefill_chunk)
    stats = RunStats()
    cuda = decoder.device.type == "cuda"
    t_start = time.perf_counter()
    with Progress(*progress_columns(), disable=not show_progress, transient=False) as progress:
        bar = progress.add_task(suite.name, total=n_todo, tps="-")
        for cells in groups:
            group = suite.prepare(cells)
            if cuda:
                torch.cuda.reset_peak_memory_stats(decoder.device)
            processors = [None if j.schema is None else target.json_processor(j.schema) for j in group.jobs]
            for d in decoder.run_group([j.ids for j in group.jobs], group.base, processors):
                job = group.jobs[d.index]
                row = dict(job.row)
                row.update(target.answer_fields(d.new_ids), answer_tokens=len(d.new_ids),
                           reused_tokens=d.reused_tokens, computed_tokens=d.computed_tokens, seconds=round(d.seconds, 3),
                           decode_seconds=round(d.decode_seconds, 4))
                if cuda:
                    row["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(decoder.device)
                row.update(suite.score(job, row["answer"]))
                run_dir.append(row)
                stats.add(row, len(job.ids), d.computed_tokens)
                stats.tick(progress, bar, t_start)
    return stats


# ---------------------------------------------------------------- served models
# Cells run concurrently against a model server (``--backend openai --concurrency N``).
#
# A served model decodes every prompt in full (the in-process runner's prefix-cache sharing does not apply;
# servers with prefix caching, like vLLM, do it on their side), so cells are independent requests: a bounded
# thread pool keeps ``concurrency`` of them in flight, prompts are built in the main thread, and rows are
# appended in the order cells finish. Rows are keyed by cell id, so results do not depend on that order.
#
# Failures: a malformed or empty response, or a request the server refuses, goes to ``errors.jsonl`` (never
# to results.jsonl, so it is never scored as a wrong answer, and ``--resume`` retries the cell). A server that
# stops answering (ServerUnavailableError, after the client's bounded retries) stops the run: rows already
# written stay, requests not yet sent are cancelled, and the error propagates to the command line.

ERRORS = "errors.jsonl"


def run_concurrent(suite: Suite, target: Any, run_dir: RunDir, done: dict[str, dict], *, concurrency: int,
                   show_progress: bool = True) -> RunStats:
    """Run every cell of ``suite`` not in ``done`` through ``target.llm.complete_ids``, ``concurrency`` at a time."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    n_todo, groups = todo_groups(suite, done)
    stats = RunStats()
    errors = mismatched = 0
    t_start = time.perf_counter()
    pending: dict[Future, Job] = {}
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="cell")
    with Progress(*progress_columns(), disable=not show_progress, transient=False) as progress:
        bar = progress.add_task(suite.name, total=n_todo, tps="-")

        def finish(limit: int) -> None:
            """Write the results of finished requests until at most ``limit`` are in flight."""
            nonlocal errors, mismatched
            while len(pending) > limit:
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in finished:
                    job = pending.pop(future)
                    try:
                        response, seconds = future.result()
                    except CELL_ERRORS as exc:
                        errors += 1
                        append_jsonl(run_dir.path / ERRORS, {"cell_id": job.cell.cell_id, **job.cell.coords,
                                                        "error": type(exc).__name__, "message": str(exc),
                                                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                    else:
                        row = _row(suite, job, response, seconds)
                        mismatched += bool(row["prompt_tokens_mismatch"])
                        run_dir.append(row)
                        stats.add(row, len(job.ids), len(job.ids))
                    stats.tick(progress, bar, t_start)

        try:
            for cells in groups:
                for job in suite.prepare(cells).jobs:
                    pending[pool.submit(_ask, target, job, suite.max_new_tokens)] = job
                    finish(2 * concurrency)  # keep the pool fed; prompts are built at most one window ahead
            finish(0)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    if errors:
        print(f"warning: {errors} cell(s) got a malformed, empty or refused response; they are listed in "
              f"{run_dir.path / ERRORS} and not scored; --resume retries them", file=sys.stderr)
    if mismatched:
        print(f"warning: for {mismatched} cell(s) the server's usage.prompt_tokens differs from the local token "
              f"count (prompt_tokens_mismatch in results.jsonl); the served tokenizer is not the local one",
              file=sys.stderr)
    return stats


def _ask(target: Any, job: Job, max_new_tokens: int) -> tuple[Any, float]:
    t0 = time.perf_counter()
    extra = {} if job.schema is None else {"json_schema": job.schema}  # the server's response_format
    response = target.llm.complete_ids(job.ids, max_new_tokens=max_new_tokens, **extra)
    return response, time.perf_counter() - t0


def _row(suite: Suite, job: Job, response: Any, seconds: float) -> dict[str, Any]:
    extra = response.additional_kwargs
    row = dict(job.row)
    row.update(answer=response.text, answer_tokens=extra.get("completion_tokens"), reused_tokens=0,
               computed_tokens=len(job.ids), seconds=round(seconds, 3),
               server_prompt_tokens=extra.get("server_prompt_tokens"),
               prompt_tokens_mismatch=extra.get("prompt_tokens_mismatch"))
    row.update(suite.score(job, response.text))
    return row
