"""The one skeleton of a suite run, from typed settings to report: configuration hash, run directory
(resume), the model under test, run.json, the runner, the report.

A suite brings what is its own: the fingerprints of its inputs that the configuration hash covers besides
the settings (haystack text, QA file), and ``build``, which makes its cells' source (a :class:`Suite` of
evals.core.runner) once the run directory is open and the model loaded, and returns what run.json records
of it besides the provenance. ``build`` runs before run.json is written, so a check it raises (a prompt
that cannot fit) leaves a new run directory without a run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from evals.core import backend
from evals.core.registry import SuiteRecord
from evals.core.runner import Suite, run
from evals.core.settings import SuiteSettings
from evals.core.spec import config_hash
from evals.core.store import RUN_JSON, RunDir, provenance


@dataclass(frozen=True)
class Opened:
    """What ``build`` gets: the open run directory, the configuration hash and the loaded model under test."""

    run_dir: RunDir
    config: str
    target: Any

    @property
    def out(self) -> Path:
        return self.run_dir.path


def execute(suite: SuiteRecord, s: SuiteSettings, fingerprints: dict[str, Any],
            build: Callable[[Opened], tuple[Suite, dict[str, Any]]], target: Any = None) -> Path:
    """Run (or resume) a run of ``suite`` with settings ``s`` (an ``out``, ``resume`` and ``progress`` field
    each); returns its directory. ``target``: an already loaded model (tests)."""
    out = Path(s.out or f"runs/{suite.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    hashed = {**s.hashed(), **fingerprints}
    config = config_hash(hashed)
    run_dir = RunDir(out)
    done = run_dir.open(suite.name, hashed, config, s.resume)
    target = target or backend.load(s)
    cells, recorded = build(Opened(run_dir, config, target))
    if not (run_dir.path / RUN_JSON).exists():
        run_dir.write_run({**provenance(suite.name, hashed, config, target.info, out), **recorded})
    stats = run(cells, target, run_dir, done, show_progress=s.progress, concurrency=s.concurrency,
                batch_size=s.batch_size, prefill_chunk=s.prefill_chunk)
    suite.code.write_report(run_dir)
    print(f"{stats.cells} cells run ({len(done)} resumed); report: {run_dir.path / 'report.md'}")
    return run_dir.path
