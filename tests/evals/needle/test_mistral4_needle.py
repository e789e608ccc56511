"""Issue 15's grid at toy width: benchmarks/mistral4_needle.py's FP8 Mistral-4 checkpoint (Mistral3 layout) with the
Tekken tokenizer, loaded as NF4 by ragkit and run as ``python -m evals.needle`` in a process that cannot import
mistral-common or tiktoken (the GPU host has neither); then the per-layer timings and the one JSON they write;
the report's projected-vs-measured table; on a GPU, peak memory per cell and the projection in run.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evals.core.store import RunDir
from evals.core.targets import Grid
from evals.needle.report import projected_vs_measured, needle_frame

# runs a module as __main__ with mistral-common and tiktoken made unimportable, as on the GPU host
WITHOUT_MISTRAL_COMMON = ("import runpy, sys; sys.modules['mistral_common'] = None; sys.modules['tiktoken'] = None; "
                          "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", WITHOUT_MISTRAL_COMMON, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_mistral4_tekken_dir, repo_root, tmp_path_factory):
    """The benchmark's --tiny checkpoint, its tokenizer copied from a saved Tekken directory."""
    ckpt = tmp_path_factory.mktemp("m4") / "ckpt"
    _run("benchmarks.mistral4_needle", "write", str(ckpt), "--tokenizer", str(tiny_mistral4_tekken_dir), "--tiny",
         cwd=repo_root)
    return ckpt


def _needle_run(ckpt: Path, device: str, out: Path, repo_root: Path) -> tuple[list[dict], dict]:
    """The rows and run.json of ``python -m evals.needle`` on ``ckpt`` at 1k x depths 0/50/100 + control."""
    _run("evals.needle", "--model", str(ckpt), "--quant", "nf4", "--dtype", "bfloat16", "--lengths", "1k",
         "--depths", "0,50,100", "--no-progress", "--device", device, "--out", str(out), cwd=repo_root)
    run_dir = RunDir(out)
    return list(run_dir.rows()), run_dir.read_run()


@pytest.fixture(scope="module")
def cpu_run(tiny_checkpoint, repo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("m4_run") / "run"
    return out, *_needle_run(tiny_checkpoint, "cpu", out, repo_root)


@pytest.mark.slow
def test_the_tiny_grid_runs_through_evals_needle_without_mistral_common(cpu_run, tiny_checkpoint, repo_root, tmp_path):
    out, rows, meta = cpu_run
    assert sorted(str(r["depth"]) for r in rows) == ["0.0", "100.0", "50.0", "None"]
    assert meta["model"]["quant"] == "nf4" and meta["projection"] is None  # no GPU: nothing projected beside it
    assert all(r["seconds"] > r["decode_seconds"] > 0 and "gpu_peak_bytes" not in r for r in rows)
    # the group computed the needle-free prompt once and each needle cell's tail: far fewer than 4 prompts
    computed, prompts = sum(r["computed_tokens"] for r in rows), sum(r["prompt_tokens"] for r in rows)
    assert computed == prompts - sum(r["reused_tokens"] for r in rows) and computed < 0.7 * prompts
    result = tmp_path / "m4.json"
    _run("benchmarks.mistral4_needle", "layers", str(tiny_checkpoint), "--run", str(out), "--lengths", "1k",
         "--steps", "3", "--device", "cpu", "--out", str(result), cwd=repo_root)
    got = json.loads(result.read_text())
    assert len(got["needle_run"]["cells"]) == 4 and got["needle_run"]["settings"]["lengths"] == [1024]
    timing = got["layer_times"]["by_length"][0]
    assert got["layer_times"]["layers"] == 4 and len(timing["prefill_s_per_layer"]) == 4
    assert 0 < sum(timing["prefill_s_per_layer"]) < timing["prefill_s"]
    assert len(timing["decode_ms_per_layer"]) == 4 and sum(timing["decode_ms_per_layer"]) < timing["decode_step_ms"]
    assert len(timing["short_call_s"]) == 4 and 0 < min(timing["short_call_s"]) < timing["prefill_s"]
    full = got["full_model"][0]  # layer shares x 36 / 4, the rest once: longer than the 4-layer run, < 9x it
    measured = sum(r["seconds"] for r in rows)
    assert full["layers"] == 36 and measured < full["wall_s"] < 9 * measured and "peak_bytes" not in full


@pytest.mark.slow
def test_the_report_sets_the_projection_beside_what_was_measured(cpu_run, tiny_checkpoint, repo_root, tmp_path):
    """A run on a GPU stores --plan's projection in run.json (here: the H200's, as --gpu h200 projects it) and
    the report tables it per length beside the cells' summed wall time and tokens forwarded."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(cpu_run[0], out)
    run_dir = RunDir(out)
    meta = run_dir.read_run()
    rows, _, _ = Grid(str(tiny_checkpoint), "nf4", [1024], (0, 50, 100), 1, True, 32, "h200", True).rows()
    meta["projection"] = {"gpu": "h200", "factors": "gpu_factors.json",
                          "lengths": [{"length": r.length, "seconds": r.seconds, "prefill_s": r.prefill_s,
                                       "decode_s": r.decode_s, "tokens_fed": r.tokens_fed,
                                       "peak_bytes": r.peak_bytes} for r in rows]}
    (out / "run.json").write_text(json.dumps(meta))
    cells = list(run_dir.rows())
    table = projected_vs_measured(needle_frame(cells, meta), meta["projection"])
    assert table["length"].tolist() == [1024] and table["cells"].tolist() == [4]
    assert table["tokens forwarded"][0] == sum(r["computed_tokens"] for r in cells)
    assert table["wall s"][0] == round(sum(r["seconds"] for r in cells), 2)
    assert abs(table["plan tokens"][0] / table["tokens forwarded"][0] - 1) < 0.02  # the runner's calls, modelled
    _run("evals.needle", "--report", str(out), cwd=repo_root)
    report = (out / "report.md").read_text()
    assert "## Projected vs measured (h200)" in report and "| 1024 | 4 |" in report


@pytest.mark.gpu
def test_on_a_gpu_cells_record_peak_memory_and_run_json_the_projection(tiny_checkpoint, repo_root, tmp_path):
    import torch

    out = tmp_path / "run"
    rows, meta = _needle_run(tiny_checkpoint, "cuda", out, repo_root)
    assert all(r["gpu_peak_bytes"] > 0 for r in rows)
    if torch.cuda.get_device_name(0).split()[-1].lower().startswith("h200"):
        assert meta["projection"]["gpu"] == "h200" and meta["projection"]["lengths"][0]["length"] == 1024
        assert "## Projected vs measured" in (out / "report.md").read_text()


def test_the_full_model_memory_is_its_weights_and_caches_plus_the_measured_activations():
    """The GPU branch of the extrapolation (cells with a peak, layers with loaded weights), here on the shipped
    config as both the measured and the full model: activations = peak - weights - the measured caches (shared +
    one copy per decode row: 2 cells, 2 rows at batch 8)."""
    from benchmarks.mistral4_needle import FULL_MODEL, extrapolate
    from ragkit.placement import load_config
    from ragkit.planner import plan

    full = plan(load_config(FULL_MODEL)[0], quant="nf4")
    n, weights, activations = 32768, 8 * 2**30, 3 * 2**30
    peak = weights + 3 * full.kv.bytes_per_token * n + activations
    cells = [{"length": n, "seconds": 2.0, "decode_seconds": 0.5, "gpu_peak_bytes": peak - d} for d in (0, 10)]
    layers = {"layers": full.kv.layers, "weights_bytes": weights,
              "by_length": [{"length": n, "prefill_s": 1.0, "prefill_s_per_layer": [0.9 / full.kv.layers] * full.kv.layers,
                             "decode_step_ms": 20.0, "decode_ms_per_layer": [0.5] * full.kv.layers}]}
    (got,) = extrapolate({"cells": cells, "settings": {"batch_size": None}}, layers, FULL_MODEL)
    assert got["activation_bytes"] == activations and got["decode_rows"] == 2
    assert got["kv_cache_bytes"] == 3 * full.kv.bytes_per_token * n
    assert got["peak_bytes"] == full.weights_bytes + 3 * full.kv.bytes_per_token * n + activations
    assert got["wall_s"] == pytest.approx(4.0)  # as many layers as measured: the run's own time


def test_the_extrapolation_counts_each_layer_at_the_median_and_a_first_layer_excess_once():
    from benchmarks.mistral4_needle import _layer_scale

    # 4 layers of 1 s, the first 0.5 s longer (cuDNN planning a new shape), 0.2 s of embeddings and head
    assert _layer_scale([1.5, 1.0, 1.0, 1.0], 4.7, 36) == pytest.approx((0.2 + 36 * 1.0 + 0.5) / 4.7)
    assert _layer_scale([1.0, 1.0], 2.2, 2) == pytest.approx(1.0)
