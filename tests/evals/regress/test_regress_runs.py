"""evals.regress on finished runs made by the real suites (embedded SmolLM2, tiny grids), every case through a
real ``python -m evals.regress`` subprocess: two run directories without a suite file, needle and lost in the
middle; a day directory of several entries; --suite checked against the runs (a mismatch is exit 2 naming
the difference); --quant checked against the candidate; the detectable drop in the report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TINY = """runs:
  - suite: needle
    name: niah
    settings: {lengths: 256, depths: "50%", seeds: 1, controls: false}
  - suite: lost_in_middle
    name: litm
    settings: {task: kv, kv_pairs: 4, positions: "first,last", questions: 1}
"""


def regress(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "evals.regress", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, repo_root):
    """A regress day directory ``runs/day1`` (entries niah and litm, both really run) and ``baseline``, the copy
    of it that --update-baseline promoted: the first night of a job."""
    root = tmp_path_factory.mktemp("regress_runs")
    (root / "tiny.yaml").write_text(TINY)
    first = regress("--suite", "tiny.yaml", "--baseline", "baseline", "--runs-dir", "runs", "--run-name", "day1",
                    "--update-baseline", "--no-progress", cwd=root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (root / "baseline" / "niah" / "run.json").exists() and (root / "runs/day1/litm/run.json").exists()
    return root


@pytest.mark.slow  # real SmolLM2 suite runs: minutes on 2 cores; run with --run-slow
def test_two_needle_run_dirs_compare_without_a_suite_file(runs):
    proc = regress("--baseline", "baseline/niah", "--candidate", "runs/day1/niah", cwd=runs)
    assert proc.returncode == 0, proc.stderr
    assert "## needle (needle): ok" in proc.stdout and "| all cells | 1 |" in proc.stdout
    assert ("with 1 paired cell, no drop at all would have been flagged at alpha 0.05" in proc.stdout
            and "add seeds or depths" in proc.stdout)


@pytest.mark.slow  # real SmolLM2 suite runs: minutes on 2 cores; run with --run-slow
def test_two_lost_in_the_middle_run_dirs_compare_without_a_suite_file(runs):
    proc = regress("--baseline", "baseline/litm", "--candidate", "runs/day1/litm", cwd=runs)
    assert proc.returncode == 0, proc.stderr
    assert "## lost_in_middle (lost_in_middle): ok" in proc.stdout and "| all cells | 2 |" in proc.stdout
    assert "| kv pairs=4 | 2 |" in proc.stdout and "with 2 paired cells, no drop at all" in proc.stdout


@pytest.mark.slow  # real SmolLM2 suite runs: minutes on 2 cores; run with --run-slow
def test_a_day_directory_of_several_entries_compares_every_entry(runs):
    proc = regress("--baseline", "baseline", "--candidate", "runs/day1", "--markdown", "day1.md", cwd=runs)
    assert proc.returncode == 0, proc.stderr
    text = (runs / "day1.md").read_text()
    assert "## litm (lost_in_middle): ok" in text and "## niah (needle): ok" in text


@pytest.mark.slow  # real SmolLM2 suite runs: minutes on 2 cores; run with --run-slow
def test_a_day_directory_missing_an_entry_is_invalid_naming_it(runs, tmp_path):
    partial = tmp_path / "day2"
    shutil.copytree(runs / "runs/day1/niah", partial / "niah")
    proc = regress("--baseline", runs / "baseline", "--candidate", partial, cwd=runs)
    assert proc.returncode == 2
    assert f"invalid comparison (litm): {partial / 'litm'} is not a run directory" in proc.stderr


@pytest.mark.slow  # real SmolLM2 suite runs: minutes on 2 cores; run with --run-slow
def test_the_suite_file_that_made_the_runs_is_checked_and_used(runs):
    proc = regress("--suite", "tiny.yaml", "--baseline", "baseline", "--candidate", "runs/day1", cwd=runs)
    assert proc.returncode == 0, proc.stderr
    assert "## niah (needle): ok" in proc.stdout and "## litm (lost_in_middle): ok" in proc.stdout


@pytest.mark.parametrize("suite, baseline, candidate, message", [
    ("evals/suites/nightly.yaml", "baseline/niah", "runs/day1/niah",
     "does not describe --candidate runs/day1/niah (entry 'needle'): controls: True vs the run's False; depths: "
     "[0.0, 25.0, 50.0, 75.0, 100.0] vs the run's [50.0]; haystack: ['docs', 'novels'] vs the run's "
     "['corpora/sqlite', 'corpora/python']; lengths: [1024, 2048, 4096, 7168] vs the run's [256]; seeds: [1, 2, 3] vs the run's [1]"),
    ("evals/suites/nightly.yaml", "baseline/litm", "runs/day1/litm",
     "entry 'needle' is a needle suite, the run a lost_in_middle run"),
    ("litm2.yaml", "baseline/litm", "runs/day1/litm", "(entry 'lost_in_middle'): questions: 2 vs the run's 1"),
    ("niah_only.yaml", "baseline", "runs/day1", "it holds entries ['litm'] that --suite niah_only.yaml does not name"),
])
@pytest.mark.slow  # real SmolLM2 suite runs: minutes on 2 cores; run with --run-slow
def test_a_suite_file_that_does_not_describe_the_runs_is_exit_2_naming_the_difference(runs, repo_root, suite,
                                                                                       baseline, candidate, message):
    (runs / "litm2.yaml").write_text("runs:\n  - suite: lost_in_middle\n    settings: {task: kv, kv_pairs: 4, "
                                     "positions: 'first,last', questions: 2}\n")
    (runs / "niah_only.yaml").write_text(TINY.split("  - suite: lost_in_middle")[0])
    path = repo_root / suite if suite.startswith("evals/") else suite
    proc = regress("--suite", path, "--baseline", baseline, "--candidate", candidate, cwd=runs)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr and "drop --suite" in proc.stderr
    assert not proc.stdout  # refused before comparing: no report that could be read as a verdict


@pytest.mark.slow  # real SmolLM2 suite runs: minutes on 2 cores; run with --run-slow
def test_quant_that_the_candidate_was_not_made_with_is_exit_2(runs):
    proc = regress("--baseline", "baseline/niah", "--candidate", "runs/day1/niah", "--quant", "nf4", cwd=runs)
    assert proc.returncode == 2
    assert "--candidate runs/day1/niah: --quant nf4 but the run was made with quant 'none'" in proc.stderr


def test_without_suite_or_candidate_exit_2_says_what_to_give(tmp_path):
    proc = regress("--baseline", tmp_path, "--runs-dir", tmp_path / "runs", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--suite is required to run a regression job now" in proc.stderr and "--candidate RUN" in proc.stderr
