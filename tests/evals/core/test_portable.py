"""Run directories and committed results carry no machine paths (evals.core.portable), and a run directory moved
elsewhere still resumes and rebuilds its prompts (a real SmolLM2 run through real subprocesses)."""

from __future__ import annotations

import pytest

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from evals.core.portable import REPO, command, portable_path, portable_value

# an absolute path of the kind that leaks a user or a directory layout (not a URL's path: a word char precedes it)
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:root|home|work|tmp|Users|mnt|srv|opt|var)/")


def test_paths_become_relative_to_the_run_dir_cwd_or_repo_else_their_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "r1"
    assert portable_path(run / "rag" / "1024-s1", run) == "rag/1024-s1"
    assert portable_path(tmp_path / "texts" / "a.txt") == "texts/a.txt"
    assert portable_path(REPO / "corpora" / "qa" / "qa.jsonl") == "corpora/qa/qa.jsonl"
    assert portable_path("/home/someone/models/smol.gguf") == "smol.gguf"
    assert portable_path("corpora/sqlite") == "corpora/sqlite"  # relative: as given
    assert portable_value({"a": ["/root/x/y.txt", 3], "url": "http://127.0.0.1:8000/v1"}) == \
        {"a": ["y.txt", 3], "url": "http://127.0.0.1:8000/v1"}


def test_store_urls_keep_all_but_their_password_in_commands_settings_and_hashes():
    from evals.needle.suite import NeedleSettings
    url = "postgresql://ragkit:s3cret@db.example:5432/evals"
    assert portable_value({"store": url}) == {"store": "postgresql://ragkit:***@db.example:5432/evals"}
    assert "s3cret" not in command(["x.py", "--store", url]) and "s3cret" not in command(["x.py", f"--store={url}"])
    hashed = NeedleSettings(lengths=(1024,), store=url).hashed()
    assert hashed["store"] == "postgresql://ragkit:***@db.example:5432/evals"
    assert NeedleSettings(lengths=(1024,), store=url.replace("s3cret", "other")).hashed() == hashed  # same server, same cells
    assert "store" not in NeedleSettings(lengths=(1024,)).hashed()  # FAISS runs keep the cell ids they had before --store


def test_command_is_what_a_user_would_retype(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(REPO / "benchmarks" / "llm_load.py"), "--out", str(tmp_path / "runs" / "x"),
            "--haystack=/home/u/texts/a b.txt", "2k"]
    assert command(argv) == "python benchmarks/llm_load.py --out runs/x '--haystack=a b.txt' 2k"


def test_committed_results_contain_no_machine_paths(repo_root):
    listed = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=repo_root, capture_output=True, text=True)
    files = [repo_root / f for f in listed.stdout.splitlines()] if listed.returncode == 0 else \
        [p for p in (repo_root / "benchmarks" / "results").rglob("*") if p.is_file()]
    assert len(files) > 20
    leaks = []
    for path in files:
        data = path.read_bytes()
        if b"\0" in data:  # images
            continue
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                leaks.append(f"{path.relative_to(repo_root)}:{n}: {line.strip()[:120]}")
    assert not leaks, "machine paths in committed results:\n" + "\n".join(leaks[:30])


def _needle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "evals.needle", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1800)


@pytest.mark.slow  # real SmolLM2 suite runs: minutes on 2 cores; run with --run-slow
def test_a_moved_run_dir_has_no_machine_paths_and_still_resumes_and_rebuilds(tmp_path):
    made, elsewhere = tmp_path / "made-here", tmp_path / "elsewhere"
    made.mkdir()
    elsewhere.mkdir()
    flags = ["--lengths", "256", "--depths", "50%", "--no-controls", "--no-progress"]
    first = _needle(*flags, "--out", str(made / "run"), cwd=made)  # an absolute --out, as scripts give it
    assert first.returncode == 0, first.stderr[-3000:]
    run = json.loads((made / "run" / "run.json").read_text())
    assert run["command"] == "python -m evals.needle --lengths 256 --depths 50% --no-controls --no-progress --out run"
    assert run["haystack_files"][0].startswith("corpora/sqlite/") and run["settings"]["haystack"][0] == "corpora/sqlite"
    for f in (made / "run").iterdir():
        if f.suffix in (".json", ".jsonl", ".md", ".csv"):
            assert not MACHINE_PATH.search(f.read_text()), f.name
    shutil.move(made / "run", elsewhere / "moved")
    cell = json.loads((elsewhere / "moved" / "results.jsonl").read_text().splitlines()[0])
    rebuilt = _needle("--rebuild-prompt", "moved", cell["cell_id"], cwd=elsewhere)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert cell["question"] in rebuilt.stdout
    resumed = _needle(*flags, "--out", "moved", "--resume", cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "0 cells run (1 resumed)" in resumed.stdout
