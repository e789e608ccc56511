"""evals.regress mechanics on hand-built run directories written through the real RunDir API (no model: the
answers are set by the test, what is tested is the comparison, exit codes, reports, history, lock and
promotion). Real-model validity is in tests/evals/regress/test_regress_model.py (slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pandas as pd
import pytest
from filelock import FileLock

from evals.regress.jobs import main
from evals.core.spec import Cell, config_hash
from evals.core.store import RunDir, provenance

LENGTHS = (1024, 2048, 4096, 7168)
DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
SEEDS = (1, 2, 3)


def make_run(path: Path, fails: set = frozenset(), *, quant: str = "none", fingerprint: str = "tok-a",
             skip: set = frozenset(), **overrides) -> Path:
    """A finished needle run: every needle cell found except the (length, depth, seed) in ``fails``."""
    settings = {"lengths": list(LENGTHS), "depths": list(DEPTHS), "model": "default", "quant": quant,
                "dtype": None, "mode": "context", "needle": "passcode", "seeds": list(SEEDS), "max_new_tokens": 32,
                "controls": True, "recipe_version": 1, "pool": "p0", **overrides}
    config = config_hash(settings)
    run = RunDir(path)
    run.open("needle", settings, config, resume=False)
    run.write_run(provenance("needle", settings, config, {"name": "default", "quant": quant,
                                                         "tokenizer_fingerprint": fingerprint}))
    for length in LENGTHS:
        for seed in SEEDS:
            for depth in (*DEPTHS, None):
                if (length, depth, seed) in skip:
                    continue
                coords = {"mode": "context", "length": length, "seed": seed, "depth": depth, "needle": "passcode",
                          "kind": "control" if depth is None else "needle"}
                found = depth is not None and (length, depth, seed) not in fails
                run.append({"cell_id": Cell("needle", config, coords).cell_id, "suite": "needle", "config": config,
                            **coords, "expected": ["1234"], "prompt_tokens": length - 40,
                            "answer": "1234" if found else "no idea", "found": found, "score": float(found)})
    return path


def regress(tmp_path: Path, baseline: Path, candidate: Path, *extra: str) -> int:
    """Two finished runs compared as they were made (no --suite: suite and settings come from run.json)."""
    return main(["--baseline", str(baseline), "--candidate", str(candidate), "--runs-dir", str(tmp_path / "runs"),
                 *extra])


# 18 of the 60 needle cells fail at 7k (every depth, seeds 1-3) and 4k depth 0: a clear drop
CLEAR_DROP = {(7168, d, s) for d in DEPTHS for s in SEEDS} | {(4096, 0.0, s) for s in SEEDS}


@pytest.fixture
def baseline(tmp_path):
    return make_run(tmp_path / "baseline", {(7168, 100.0, 1)})


def test_mechanics_identical_runs_exit_0(tmp_path, baseline, capsys):
    candidate = make_run(tmp_path / "cand", {(7168, 100.0, 1)}, quant="nf4")
    assert regress(tmp_path, baseline, candidate) == 0
    assert "no regression (exit 0)" in capsys.readouterr().out


def test_mechanics_clear_drop_exit_1_names_where(tmp_path, baseline, capsys):
    candidate = make_run(tmp_path / "cand", CLEAR_DROP, quant="nf4")
    junit = tmp_path / "report.xml"
    md = tmp_path / "report.md"
    assert regress(tmp_path, baseline, candidate, "--junit", str(junit), "--markdown", str(md)) == 1
    text = md.read_text()
    assert "REGRESSION (exit 1)" in text and text in capsys.readouterr().out
    worse = next(line for line in text.splitlines() if line.startswith("**Got worse in:**"))
    assert "length 7k" in worse and "length 1k" not in worse and "length 4k" not in worse
    assert "length 1k" in text and "| length 1k | 15 |" in text
    root = ET.parse(junit).getroot()
    failures = [c.get("name") for c in root.iter("testcase") if c.find("failure") is not None]
    assert "all cells" in failures and "length 7k" in failures and "length 1k" not in failures
    assert root.find("testsuite").get("failures") == str(len(failures))


def test_mechanics_lists_every_flipped_cell_not_one_groups(tmp_path, baseline, capsys):
    # 17 cells go pass -> fail (7k everywhere, 4k at depth 0; the baseline already misses 7k/100%/seed 1), and
    # one fail -> pass: the list holds all of them, not only those of the last group tested (the late depths)
    candidate = make_run(tmp_path / "cand", CLEAR_DROP - {(7168, 100.0, 1)}, quant="nf4")
    assert regress(tmp_path, baseline, candidate) == 1
    out = capsys.readouterr().out
    assert "| all cells | 60 | 59/60 = 98% (95% CI 91–100%) | 43/60 = 72% (95% CI 59–81%) | -27% | 17 | 1 |" in out
    assert "Cells that went pass → fail (17):" in out and "Cells that went fail → pass (1):" in out
    assert out.count("length=4096, seed=") == 3 and "length=7168, seed=1, depth=100.0" in out


def test_mechanics_small_insignificant_drop_exit_0(tmp_path, baseline, capsys):
    candidate = make_run(tmp_path / "cand", {(7168, 100.0, 1), (4096, 50.0, 2), (2048, 25.0, 3)}, quant="nf4")
    assert regress(tmp_path, baseline, candidate) == 0
    out = capsys.readouterr().out
    assert "| all cells | 60 |" in out and "| 2 | 0 | 0.5 |" in out
    # what "no regression" could have seen: 2 * 0.5^6 = 0.031 < 0.05 <= 2 * 0.5^5; the middle band is depth 50 only
    assert ("with 60 paired cells, a drop of ≥ 6 cells (10%) would have been flagged at alpha 0.05, min drop 5%"
            in out)
    assert "in the smallest group (depth middle (33-67%), 12 paired cells) a drop of ≥ 6 cells (50%)" in out


@pytest.mark.parametrize("extra, needed", [
    (("--alpha", "0.01"), "a drop of ≥ 8 cells (13%)"),  # 2 * 0.5^8 = 0.0078 < 0.01
    (("--min-drop", "0.2"), "a drop of ≥ 12 cells (20%)"),  # the test needs 6, the min drop 12 of 60
    (("--correction", "holm"), "a drop of ≥ 9 cells (15%)"),  # 0.05 / 8 groups: 2 * 0.5^9 < 0.00625 < 2 * 0.5^8
])
def test_mechanics_detectable_drop_follows_alpha_min_drop_and_correction(tmp_path, baseline, capsys, extra, needed):
    assert regress(tmp_path, baseline, make_run(tmp_path / "cand", {(7168, 100.0, 1)}, quant="nf4"), *extra) == 0
    assert f"with 60 paired cells, {needed} would have been flagged" in capsys.readouterr().out


def test_mechanics_improvement_is_reported_not_failed(tmp_path, capsys):
    base = make_run(tmp_path / "base", CLEAR_DROP)
    candidate = make_run(tmp_path / "cand", set(), quant="nf4")
    assert regress(tmp_path, base, candidate) == 0
    assert "| improvement |" in capsys.readouterr().out


def test_mechanics_every_changed_cell_is_listed_not_only_the_last_groups(tmp_path, capsys):
    """Changed cells at an early and a late depth: both are listed (the list once held only the cells of the
    last group tested, the late depth band)."""
    base = make_run(tmp_path / "base", {(1024, 0.0, 1), (2048, 100.0, 2)})
    candidate = make_run(tmp_path / "cand", {(4096, 25.0, 3)}, quant="nf4")
    assert regress(tmp_path, base, candidate) == 0
    out = capsys.readouterr().out
    assert "Cells that went fail → pass (2):" in out and "Cells that went pass → fail (1):" in out
    assert "length=1024, seed=1, depth=0.0" in out and "length=2048, seed=2, depth=100.0" in out
    assert "length=4096, seed=3, depth=25.0" in out


def test_mechanics_drop_below_min_drop_is_not_flagged(tmp_path, baseline):
    candidate = make_run(tmp_path / "cand", CLEAR_DROP, quant="nf4")
    assert regress(tmp_path, baseline, candidate, "--min-drop", "0.95") == 0  # 7k dropped 14/15 = 93%


@pytest.mark.parametrize("kind, make, message", [
    ("settings", dict(max_new_tokens=64), "max_new_tokens: baseline 32 vs candidate 64"),
    ("missing cells", dict(skip={(2048, 50.0, 2), (7168, 0.0, 1)}), "the candidate lacks 2 cell(s)"),
    ("tokenizer", dict(fingerprint="tok-b"), "the tokenizers differ (fingerprint tok-a vs tok-b)"),
])
def test_mechanics_invalid_comparison_exit_2(tmp_path, baseline, capsys, kind, make, message):
    candidate = make_run(tmp_path / "cand", {(7168, 100.0, 1)}, quant="nf4", **make)
    junit = tmp_path / "r.xml"
    assert regress(tmp_path, baseline, candidate, "--junit", str(junit)) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "INVALID COMPARISON (exit 2)" in captured.out
    assert ET.parse(junit).getroot().find("testsuite/testcase/error").get("message").count(message) == 1


def test_mechanics_both_runs_unfinished_in_the_same_cells_exit_2(tmp_path, capsys):
    unfinished = {(7168, d, s) for d in DEPTHS for s in SEEDS}  # both killed before 7k: the settings say 60 cells
    base = make_run(tmp_path / "base", skip=unfinished)
    candidate = make_run(tmp_path / "cand", quant="nf4", skip=unfinished)
    assert regress(tmp_path, base, candidate) == 2
    err = capsys.readouterr().err
    assert "the baseline lacks 15 cell(s)" in err and "the candidate lacks 15 cell(s)" in err


def test_mechanics_no_baseline_exit_2_says_how(tmp_path, capsys):
    candidate = make_run(tmp_path / "cand")
    assert regress(tmp_path, tmp_path / "nope", candidate) == 2
    assert "--update-baseline" in capsys.readouterr().err


@pytest.mark.parametrize("body, message", [
    ("runs:\n  - suite: niah\n", "suite 'niah' is unknown"),
    ("runs:\n  - suite: needle\n    setings: {}\n", "unknown keys ['setings']"),
    ("runs:\n  - suite: needle\n    settings: {lengths: 1k, depthz: 3}\n", "unknown needle settings ['depthz']"),
    ("runs:\n  - suite: needle\n    settings: {depths: 3}\n", "lengths"),
    ("runs:\n  - suite: needle\n    settings: {lengths: 1k, out: x}\n", "['out'] are set by evals.regress"),
    ("runs:\n  - {suite: needle, settings: {lengths: 1k}}\n  - {suite: needle, settings: {lengths: 2k}}\n",
     "name 'needle' must be unique"),
    ("runs: []\n", "non-empty list"),
])
def test_bad_suite_file_exit_2_names_the_problem(tmp_path, capsys, body, message):
    suite = tmp_path / "regress.yaml"
    suite.write_text(body)
    assert main(["--suite", str(suite), "--baseline", str(tmp_path), "--runs-dir", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


def test_mechanics_history_appended_and_same_day_rerun_idempotent(tmp_path, baseline):
    hist = tmp_path / "hist" / "history.parquet"
    cand = make_run(tmp_path / "2026-11-28", {(7168, 100.0, 1)}, quant="nf4")
    assert regress(tmp_path, baseline, cand, "--history", str(hist)) == 0
    assert regress(tmp_path, baseline, cand, "--history", str(hist)) == 0  # same run id: replaced
    table = pd.read_parquet(hist)
    assert len(table) == 1 and table.loc[0, "run_id"] == "2026-11-28" and table.loc[0, "n"] == 60
    later = make_run(tmp_path / "2026-11-29", CLEAR_DROP, quant="nf4")
    assert regress(tmp_path, baseline, later, "--history", str(hist)) == 1
    table = pd.read_parquet(hist)
    assert list(table["run_id"]) == ["2026-11-28", "2026-11-29"]
    assert list(table["regression"]) == [False, True] and table.loc[1, "pass_rate"] == pytest.approx(42 / 60)
    assert {"date", "suite", "model", "quant", "git_commit", "pass_rate", "n", "p_value"} <= set(table.columns)
    assert (hist.parent / "history.png").stat().st_size > 1000


def test_mechanics_first_run_is_the_first_point_of_the_history(tmp_path):
    hist = tmp_path / "history.csv"
    first = make_run(tmp_path / "2026-11-27", {(7168, 100.0, 1)})
    assert regress(tmp_path, tmp_path / "baseline", first, "--update-baseline", "--history", str(hist)) == 0
    row = pd.read_csv(hist).iloc[0]
    assert (row["status"], row["run_id"], row["n"], row["passed"]) == ("baseline", "2026-11-27", 60, 59)
    assert pd.isna(row["p_value"]) and pd.isna(row["baseline_pass_rate"])
    assert regress(tmp_path, tmp_path / "baseline", make_run(tmp_path / "2026-11-28", CLEAR_DROP, quant="nf4"),
                   "--history", str(hist)) == 1
    table = pd.read_csv(hist)
    assert list(table["status"]) == ["baseline", "regression"]
    assert table.loc[1, "baseline_pass_rate"] == pytest.approx(59 / 60)


def test_mechanics_history_csv(tmp_path, baseline):
    hist = tmp_path / "history.csv"
    assert regress(tmp_path, baseline, make_run(tmp_path / "c", quant="nf4"), "--history", str(hist)) == 0
    assert pd.read_csv(hist).loc[0, "status"] == "ok" and (tmp_path / "history.png").exists()


def test_mechanics_update_baseline_promotes_explicitly(tmp_path, baseline):
    candidate = make_run(tmp_path / "cand", CLEAR_DROP, quant="nf4")
    assert regress(tmp_path, baseline, candidate) == 1
    assert RunDir(baseline).read_run()["settings"]["quant"] == "none"  # never implicitly
    assert regress(tmp_path, baseline, candidate, "--update-baseline") == 1  # the verdict is still reported
    assert RunDir(baseline).read_run()["settings"]["quant"] == "nf4"
    assert regress(tmp_path, baseline, candidate) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".baseline")]  # no temp dirs left


def test_mechanics_lock_refuses_a_second_run_exit_3(tmp_path, baseline):
    runs = tmp_path / "runs"
    runs.mkdir()
    with FileLock(runs / ".regress.lock"):
        proc = subprocess.run([sys.executable, "-m", "evals.regress", "--suite", "evals/suites/nightly.yaml",
                               "--baseline", str(baseline), "--candidate", str(baseline), "--runs-dir", str(runs)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "another evals.regress run holds" in proc.stderr
