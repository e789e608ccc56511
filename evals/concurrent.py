"""Cells run concurrently against a model server (``--backend openai --concurrency N``).

A served model decodes every prompt in full (the in-process runner's prefix-cache sharing does not apply;
servers with prefix caching, like vLLM, do it on their side), so cells are independent requests: a bounded
thread pool keeps ``concurrency`` of them in flight, prompts are built in the main thread, and rows are
appended in the order cells finish. Rows are keyed by cell id, so results do not depend on that order.

Failures: a malformed or empty response, or a request the server refuses, goes to ``errors.jsonl`` (never
to results.jsonl, so it is never scored as a wrong answer, and ``--resume`` retries the cell). A server that
stops answering (ServerUnavailableError, after the client's bounded retries) stops the run: rows already
written stay, requests not yet sent are cancelled, and the error propagates to the command line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Hashable

from rich.progress import Progress

from evals.runner import Job, RunStats, Suite, progress_columns
from evals.store import RunDir
from evals.targets import CELL_ERRORS  # recorded per cell; any other error stops the run

ERRORS = "errors.jsonl"


def run_concurrent(suite: Suite, target: Any, run_dir: RunDir, done: dict[str, dict], *, concurrency: int,
                   show_progress: bool = True) -> RunStats:
    """Run every cell of ``suite`` not in ``done`` through ``target.llm.complete_ids``, ``concurrency`` at a time."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    todo = [c for c in suite.cells() if c.cell_id not in done]
    groups: dict[Hashable, list] = {}
    for c in todo:
        groups.setdefault(suite.group_key(c), []).append(c)
    stats = RunStats()
    errors = mismatched = 0
    t_start = time.perf_counter()
    pending: dict[Future, Job] = {}
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="cell")
    with Progress(*progress_columns(), disable=not show_progress, transient=False) as progress:
        bar = progress.add_task(suite.name, total=len(todo), tps="-")

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
                        _append(run_dir.path / ERRORS, {"cell_id": job.cell.cell_id, **job.cell.coords,
                                                        "error": type(exc).__name__, "message": str(exc),
                                                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                    else:
                        row = _row(suite, job, response, seconds)
                        mismatched += bool(row["prompt_tokens_mismatch"])
                        run_dir.append(row)
                        stats.rows.append(row)
                        stats.cells += 1
                        stats.prompt_tokens += len(job.ids)
                        stats.computed_tokens += len(job.ids)
                    stats.seconds = time.perf_counter() - t_start
                    progress.update(bar, advance=1, tps=f"{stats.prompt_tokens / max(stats.seconds, 1e-9):,.0f}")

        try:
            for cells in groups.values():
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
    response = target.llm.complete_ids(job.ids, max_new_tokens=max_new_tokens)
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


def _append(path: os.PathLike[str], record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
