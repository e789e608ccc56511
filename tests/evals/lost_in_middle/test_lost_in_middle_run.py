"""A real lost-in-the-middle run on SmolLM2 in a subprocess: SIGKILLed mid-run, resumed, and the oracle beats
closed-book (slow: several minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

QUESTIONS = 12


@pytest.mark.slow
def test_killed_run_resumes_and_oracle_beats_closed_book(tmp_path, repo_root):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "evals.lost_in_middle", "--task", "qa", "--docs", "10", "--positions", "first",
           "--orderings", "none", "--distractors", "random", "--questions", str(QUESTIONS),
           "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    results = out / "results.jsonl"
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 4:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = results.read_bytes()
    finished_before = before[: before.rfind(b"\n") + 1].decode().splitlines()
    assert 4 <= len(finished_before) < 3 * QUESTIONS

    again = subprocess.run([*cmd, "--resume"], cwd=repo_root, env=env, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    lines = results.read_text().splitlines()
    assert lines[: len(finished_before)] == finished_before  # nothing finished was lost or recomputed
    rows = [json.loads(line) for line in lines]
    assert len({r["cell_id"] for r in rows}) == len(rows) == 3 * QUESTIONS
    assert f"{3 * QUESTIONS - len(finished_before)} cells run ({len(finished_before)} resumed)" in again.stdout

    def rate(kind: str) -> float:
        sel = [r["found"] for r in rows if r["kind"] == kind]
        return sum(sel) / len(sel)

    assert rate("oracle") > rate("closed_book")
    report = (out / "report.md").read_text()
    assert "oracle (gold document only)" in report and (out / "curve.png").exists()
