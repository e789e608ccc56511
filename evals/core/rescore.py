"""Re-score a finished run from its stored answers, without generating again (as inspect_ai's ``inspect score``).

The rows are rewritten with the chosen scorer's verdict (and the other scorer's beside it) into ``out``: a new
run directory (run.json copied), or the run itself, rewritten atomically. Answers, prompts' recipes and cell
ids are untouched; run.json gains a ``rescored`` entry (scorer, version, when, from where).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from evals.core.errors import RunDirError
from evals.core.scorers import DEFAULT, SCORERS, check, scorer_of
from evals.core.store import RESULTS, RunDir

if TYPE_CHECKING:
    from evals.core.registry import SuiteRecord


def rescore(run: str | Path, scorer: str, score_row: Callable[[dict[str, Any], str, dict[str, Any]], dict[str, Any]],
            out: str | Path | None = None) -> RunDir:
    """Re-score every row of ``run`` with ``score_row(row, scorer, run_json)`` (the row's new fields) into ``out``
    (default: ``run`` itself); returns the run directory written."""
    check(scorer)
    src = RunDir(run)
    meta = src.read_run()
    rows = src.rows()
    if not rows:
        raise RunDirError(f"{src.path} has no finished cells to re-score ({src.results_path} is empty)")
    dst = RunDir(out) if out else src
    if dst.path.resolve() != src.path.resolve():
        if (dst.path / "run.json").exists():
            raise RunDirError(f"{dst.path} already holds a run; choose another --out (nothing was changed)")
        dst.path.mkdir(parents=True, exist_ok=True)
    before = sorted({scorer_of(r) for r in rows})
    new = [{**r, **score_row(r, scorer, meta)} for r in rows]
    tmp = dst.path / (RESULTS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, default=str) + "\n" for r in new)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst.results_path)
    git = meta.get("git") or {}
    if not git.get("commit") and git.get("dirty") is not None:  # older runs said dirty: false without a commit
        meta["git"] = {**git, "dirty": None}
    meta.setdefault("rescored", []).append({
        "scorer": scorer, "scorer_version": SCORERS[scorer], "previous": before, "from": str(src.path),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    dst.write_run(meta)
    return dst


def rescore_command(suite: SuiteRecord, run: str | Path, scorer: str | None, out: str | Path | None) -> RunDir:
    """``--rescore RUN [--scorer NAME] [--out DIR]`` of a suite's command: re-score with the suite's own rule,
    rewrite its report, say where it is."""
    scorer = scorer or DEFAULT
    run_dir = rescore(run, scorer, suite.code.rescore_row, out)
    suite.code.write_report(run_dir)
    print(f"re-scored {run} with {scorer}; report: {run_dir.path / 'report.md'}")
    return run_dir
