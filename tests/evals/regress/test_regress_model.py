"""evals.regress validity on the real embedded SmolLM2 (slow: the model answers every cell).

- the same configuration run twice -> exit 0 (greedy decoding: no false alarm);
- SmolLM2 fp32 baseline vs SmolLM2 NF4 candidate on evals/suites/regress_power.yaml (200 needle cells) ->
  exit 1, and the report names where it got worse (late depths). Measured on an H200 in about 10 minutes
  (benchmarks/results/regress_smollm2_h200/); the 3-seed nightly grid (60 cells) is too small to detect that
  drop (exit 0 there, measured too). On a 2-core CPU it takes many hours, so it is a GPU test.
"""

from __future__ import annotations

import os

import pytest

from evals.regress.jobs import main

pytestmark = pytest.mark.slow


def _regress(tmp_path, suite, *extra):
    return main(["--suite", str(suite), "--baseline", str(tmp_path / "baseline"), "--runs-dir", str(tmp_path / "runs"),
                 "--no-progress", "--history", str(tmp_path / "history.csv"), *extra])


def test_same_configuration_twice_exit_0(tmp_path, capsys):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    suite = tmp_path / "tiny.yaml"
    suite.write_text("runs:\n  - suite: needle\n    settings: {lengths: 512, depths: 3, seeds: 1, controls: false}\n")
    assert _regress(tmp_path, suite, "--run-name", "first", "--update-baseline") == 0  # first run: the baseline
    assert _regress(tmp_path, suite, "--run-name", "second", "--markdown", str(tmp_path / "r.md")) == 0
    text = (tmp_path / "r.md").read_text()
    assert "no regression (exit 0)" in text and "| all cells | 3 |" in text and "| 0 | 0 | 1 |" in text
    assert (tmp_path / "history.png").exists()


@pytest.mark.gpu
def test_fp32_baseline_vs_nf4_candidate_exit_1(tmp_path, repo_root):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    power = repo_root / "evals" / "suites" / "regress_power.yaml"
    assert _regress(tmp_path, power, "--run-name", "fp32", "--update-baseline") == 0
    md = tmp_path / "nf4.md"
    assert _regress(tmp_path, power, "--run-name", "nf4", "--quant", "nf4", "--markdown", str(md)) == 1
    assert "**Got worse in:**" in md.read_text()
