"""The needle suite end to end on the real embedded SmolLM2 (float32, CPU): decoding, runs, resume, rag."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from evals.core.decode import GreedyDecoder
from evals.core.errors import RunDirError, TooLongError
from evals.needle.haystack import Estimator, Frame, Recipe, SentencePool, fit_prompt, measure
from evals.needle.suite import NeedleSettings, execute, main, rebuild_prompt
from evals.needle.needles import make_needle
from evals.core.targets import wrap


@pytest.fixture(scope="module")
def target(smollm2):
    return wrap(smollm2)


@pytest.fixture(scope="module")
def pool(repo_root):
    return SentencePool.from_paths([repo_root / "corpora" / "sqlite"])


def test_prefix_cache_reuse_gives_the_same_greedy_answers_as_generate(target, pool):
    """decode.py's shared-prefix path must answer exactly like one plain generate() call per prompt."""
    est = Estimator(target.codec, pool)
    prompts, base = [], None
    for kind, seed in (("passcode", 1), ("kv-words", 2)):
        needle = make_needle(kind, seed)
        frame = Frame(needle.instruction, needle.question, needle.answer_prefix)
        for depth in (0, 40, 100):
            prompts.append(fit_prompt(target.codec, pool, frame, needle.sentences, (depth,), 448, 16, est).ids)
        if base is None:
            built = fit_prompt(target.codec, pool, frame, needle.sentences, (50,), 448, 16, est)
            base = measure(target.codec, pool, frame, needle.sentences, Recipe(built.recipe.pool_ids, [None])).ids
            prompts.append(base)
    decoded = {d.index: d for d in GreedyDecoder(target.model, target.eos_ids, 16).run_group(prompts, base)}
    assert sum(d.reused_tokens for d in decoded.values()) > len(base)  # the prefix was actually shared
    for i, ids in enumerate(prompts):
        assert decoded[i].new_ids == target.generate_naive(ids, 16), i


def _settings(tmp_path: Path, **kw) -> NeedleSettings:
    return NeedleSettings(**{"lengths": "384,640", "depths": "0,50,100", "haystack": ("corpora/sqlite",),
                             "out": str(tmp_path / "run"), "progress": False, **kw})


def test_small_run_finds_the_needle_and_controls_do_not_invent_it(target, tmp_path):
    out = execute(_settings(tmp_path), target)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    needles = [r for r in rows if r["kind"] == "needle"]
    controls = [r for r in rows if r["kind"] == "control"]
    assert len(needles) == 6 and len(controls) == 2
    assert sum(r["found"] for r in needles) >= 4, [r["answer"] for r in needles]
    assert not any(r["expected"][0] in r["answer"] for r in controls)
    for r in rows:  # exact lengths, recorded per cell
        assert r["actual_tokens"] == r["target_tokens"] or r["kind"] == "control"
        assert r["prompt_tokens"] + r["max_new_tokens"] == r["actual_tokens"]
    assert {r["needle_depth_actual"] for r in needles if r["depth"] == 0} == {0.0}
    assert all(90 <= r["needle_depth_actual"] <= 100 for r in needles if r["depth"] == 100)
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["kind"]) == {"needle", "control"} and summary["n"].sum() == 8
    assert (out / "heatmap.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "needle found in" in report and "float32" in report
    run = json.loads((out / "run.json").read_text())
    assert run["git"]["commit"] and run["settings"]["lengths"] == [384, 640] and run["versions"]["torch"]
    # the exact prompt of a cell comes back from its recipe
    cell = needles[1]
    text = rebuild_prompt(str(out), cell["cell_id"])
    assert target.codec.encode(text) and len(target.codec.encode(text)) == cell["prompt_tokens"]
    assert make_needle("passcode", 1).sentences[0] in text
    # a finished run is not overwritten, and other settings cannot resume it
    with pytest.raises(RunDirError, match="pass --resume"):
        execute(_settings(tmp_path), target)
    with pytest.raises(RunDirError, match="other settings .*depths"):
        execute(_settings(tmp_path, depths="0,100", resume=True), target)
    assert (out / "results.jsonl").read_text().count("\n") == 8


def test_length_above_the_context_window_fails_before_any_work(target, tmp_path, capsys):
    with pytest.raises(TooLongError, match=r"9000 exceed the model's context window of 8192"):
        execute(_settings(tmp_path, lengths="384,9000"), target)
    assert not (tmp_path / "run" / "results.jsonl").exists()
    out = execute(_settings(tmp_path / "skip", lengths="384,9000", depths="50%", skip_too_long=True), target)
    assert "skipping" in capsys.readouterr().err
    assert {json.loads(x)["length"] for x in (out / "results.jsonl").read_text().splitlines()} == {384}


@pytest.mark.slow
def test_rag_mode_records_retrieval_ranks(target, tmp_path):
    out = execute(_settings(tmp_path, lengths="1k", depths="10,90", mode="both", top_k=3, chunk_size=128), target)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    rag = [r for r in rows if r["mode"] == "rag" and r["kind"] == "needle"]
    assert len(rag) == 2 and {r["mode"] for r in rows} == {"context", "rag"}
    for r in rag:
        assert r["retrieved"] is (r["retrieval_rank"] is not None)
        assert len(r["chunks"]) == 3 and r["prompt_tokens"] < 1024
        if r["retrieved"]:
            assert 1 <= r["retrieval_rank"] <= 3 and r["expected"][0] in r["chunks"][r["retrieval_rank"] - 1]
    assert any(r["retrieved"] for r in rag)  # the passcode sentence is easy to retrieve
    summary = pd.read_csv(out / "summary.csv")
    assert "retrieval_rank" in summary and set(summary["mode"]) == {"context", "rag"}
    assert "chunk was retrieved" in (out / "report.md").read_text()


def test_bad_flags_are_reported_with_exit_code_2(tmp_path, capsys):
    assert main(["--lengths", "1kb"]) == 2
    assert "length '1kb'" in capsys.readouterr().err
    assert main(["--depths", "5"]) == 2
    assert "--lengths is required" in capsys.readouterr().err
    (tmp_path / "s.yaml").write_text("lengths: 1k\nneedles: passcode\n")
    assert main(["--config", str(tmp_path / "s.yaml")]) == 2
    assert "unknown settings ['needles']" in capsys.readouterr().err


def test_suite_file_settings_and_flags_win(repo_root):
    from evals.needle.suite import settings_from_args

    s, _ = settings_from_args(["--config", str(repo_root / "evals/suites/smoke.yaml"), "--depths", "3"])
    assert s.depths == (0, 50, 100)
    assert s.lengths  # from the file


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "evals.needle", *args], cwd=Path(__file__).resolve().parents[3],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_summary(tmp_path):
    """Kill a real run mid-way (SIGKILL, a torn line appended), resume it, compare with an uninterrupted run."""
    args = ["--lengths", "320,448", "--depths", "0,100", "--haystack", "corpora/sqlite", "--threads", "1",
            "--no-progress"]
    killed = tmp_path / "killed"
    proc = _cli([*args, "--out", str(killed)])
    results = killed / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not results.exists() or results.read_text().count("\n") < 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = results.read_text().count("\n")
    assert 2 <= done < 6, "the run finished before it could be killed"
    with open(results, "a") as f:  # the half-written row of a process killed mid-write
        f.write('{"cell_id": "torn')
    resumed = _cli([*args, "--out", str(killed), "--resume"])
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    assert f"({done} resumed)" in log and "torn last line" in log
    full = _cli([*args, "--out", str(tmp_path / "full")])
    log = full.communicate(timeout=600)[0]
    assert full.returncode == 0, log
    a, b = (pd.read_csv(p / "summary.csv") for p in (killed, tmp_path / "full"))
    pd.testing.assert_frame_equal(a, b)
    assert results.read_text().count("\n") == 6


@pytest.mark.parametrize("start,controls", [("fixed", [[1, 2, 3]]), ("seed", [[1], [2], [3]])])
def test_one_control_per_distinct_prompt(target, tmp_path, start, controls):
    """With one haystack for every seed the seeds' no-needle prompts are the same tokens: one generation, one
    control cell standing for all of them (the first seed's id); with a haystack per seed, one per seed."""
    out = execute(_settings(tmp_path, lengths="384", depths="50%", seeds="1,2,3", haystack_start=start), target)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["control_seeds"] for r in rows if r["kind"] == "control"] == controls
    assert sum(r["kind"] == "needle" for r in rows) == 3
    summary = pd.read_csv(out / "summary.csv")
    ctrl = summary[summary["kind"] == "control"].iloc[0]
    assert ctrl["n"] == len(controls) and ctrl["control_cells"] == 3
