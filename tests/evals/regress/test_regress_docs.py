"""docs/regression.md's ``console`` examples, run exactly as written (real SmolLM2 runs, real subprocesses).

Each ``$ `` line runs in bash, in order, in one directory that looks like the repository root (``evals/``
and ``corpora/`` linked in); every other line of the block must appear in that command's output
(``...`` skips), and ``$ echo $?`` checks the exit code of the command before it.
"""

from __future__ import annotations

import pytest

import os
import re
import subprocess
import sys
from pathlib import Path

BLOCK = re.compile(r"```console\n(.*?)```", re.S)


def examples(doc: Path) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of every ``$ `` line of the doc's console blocks."""
    steps: list[tuple[str, list[str]]] = []
    for block in BLOCK.findall(doc.read_text()):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif line.strip() and line.strip() != "...":
                steps[-1][1].append(line)
    return steps


@pytest.mark.slow  # real SmolLM2 suite runs: minutes on 2 cores; run with --run-slow
def test_regression_doc_examples_run_as_written(tmp_path, repo_root):
    steps = examples(repo_root / "docs" / "regression.md")
    assert len(steps) >= 5 and any("--candidate" in cmd and "--suite" not in cmd for cmd, _ in steps)
    for name in ("evals", "corpora"):
        (tmp_path / name).symlink_to(repo_root / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(repo_root)}
    last = None
    for cmd, expected in steps:
        if cmd == "echo $?":
            assert last is not None and [str(last.returncode)] == expected, (last.stdout, last.stderr)
            continue
        last = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=1800)
        shown = (last.stdout + last.stderr).splitlines()
        for line in expected:
            assert line in shown, f"{cmd!r} did not print {line!r}:\n{last.stdout[-3000:]}\n{last.stderr[-3000:]}"
