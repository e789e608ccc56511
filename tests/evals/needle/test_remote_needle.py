"""The needle suite against a real server (transformers serve + the embedded SmolLM2) on loopback.

Concurrency must not change results; a server killed mid-run leaves the finished rows, and ``--resume``
against a restarted server completes the run with the answers an uninterrupted run gives; greedy answers
through the server equal the in-process backend's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from evals.needle.suite import main as needle_main
from ragkit.serving import LocalServer

GRID = ["--lengths", "256", "--depths", "0,100", "--seeds", "1", "--max-new-tokens", "8", "--no-progress"]
N_CELLS = 3  # 1 length x 1 seed x (2 depths + 1 control): a cell takes seconds on a shared 2-core CPU


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer("default", threads=1) as s:
        yield s


def rows(out: Path) -> dict[str, dict]:
    return {r["cell_id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def answers(out: Path) -> dict[tuple, tuple]:
    return {(r["mode"], r["length"], r["seed"], r["depth"]): (r["answer"], r["found"]) for r in rows(out).values()}


@pytest.fixture(scope="module")
def serial_run(server, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("needle") / "c1"
    assert needle_main([*GRID, "--backend", "openai", "--base-url", server.base_url, "--concurrency", "1",
                        "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_concurrency_4_gives_the_same_rows_as_concurrency_1(server, serial_run, tmp_path):
    out = tmp_path / "c4"
    assert needle_main([*GRID, "--backend", "openai", "--base-url", server.base_url, "--concurrency", "4",
                        "--out", str(out)]) == 0
    one, four = rows(serial_run), rows(out)
    assert len(one) == len(four) == N_CELLS and set(one) == set(four)  # same cell ids: concurrency is not hashed
    for cell_id, row in one.items():
        assert (four[cell_id]["answer"], four[cell_id]["score"]) == (row["answer"], row["score"])
        assert row["prompt_tokens_mismatch"] == four[cell_id]["prompt_tokens_mismatch"] == 0
        assert row["server_prompt_tokens"] == row["prompt_tokens"]
    assert (out / "report.md").is_file()


@pytest.mark.slow
def test_greedy_answers_through_the_server_equal_the_in_process_backend(serial_run, tmp_path):
    out = tmp_path / "local"
    assert needle_main([*GRID, "--threads", "1", "--out", str(out)]) == 0
    assert answers(out) == answers(serial_run)


@pytest.mark.slow
def test_server_killed_mid_run_then_resume_completes_it(serial_run, tmp_path):
    out = tmp_path / "killed"
    first = LocalServer("default", threads=1).start()
    try:
        cmd = [sys.executable, "-m", "evals.needle", *GRID, "--backend", "openai", "--base-url", first.base_url,
               "--concurrency", "2", "--out", str(out)]
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 480
        while not ((out / "results.jsonl").exists() and (out / "results.jsonl").read_text().count("\n") >= 1):
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "no rows written in time"
            time.sleep(0.5)
        first.kill()
        _, err = run.communicate(timeout=120)
    finally:
        first.stop()
    assert run.returncode == 2, err
    assert "Lost the server" in err and "--resume" in err
    done = rows(out)
    assert 1 <= len(done) < N_CELLS
    with LocalServer("default", threads=1) as second:  # a new port: the base URL is run control, not configuration
        assert needle_main([*GRID, "--backend", "openai", "--base-url", second.base_url, "--concurrency", "2",
                            "--out", str(out), "--resume"]) == 0
    final = rows(out)
    assert len(final) == N_CELLS and all(final[c] == r for c, r in done.items())
    assert answers(out) == answers(serial_run)


def test_wrong_base_url_fails_before_any_work(tmp_path, capsys):
    from ragkit.serving import free_port

    out = tmp_path / "nothing"
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert needle_main([*GRID, "--backend", "openai", "--base-url", url, "--out", str(out)]) == 2
    assert f"error: No OpenAI-compatible server answers at {url}" in capsys.readouterr().err
    assert not (out / "results.jsonl").exists() and not (out / "run.json").exists()
