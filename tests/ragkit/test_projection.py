"""Know before you run: the grid projection reads its GPU ceilings and measured factors from one file, gives the
measured 4-layer run back, projects the flagship, and refuses what will not fit with the reason."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ragkit import projection
from ragkit.cli import app
from ragkit.errors import MemoryPlanError
from ragkit.placement import load_config
from ragkit.planner import plan

FLAGSHIP = "mistralai/Mistral-Small-4-119B-2603"


def test_the_measured_run_projects_to_what_was_measured(repo_root):
    measured = projection.gpu_table()["h200"]["measured"]["none"]
    bench = json.loads((repo_root / measured["source"].split(",")[0]).read_text())
    run = bench["runs"][2]
    assert (run["mode"], run["chunk"], run["T"]) == ("ragkit_sdpa", measured["prefill_chunk"], measured["prompt_tokens"])
    assert run["fresh_s"] == measured["prefill_s"] and run["decode_ms_absorbed"] / 1e3 == measured["decode_step_s"]
    shape = projection.measured_model_shape("h200")
    assert shape.layers == bench["args"]["layers"] == 4
    assert shape.weights_bytes == pytest.approx(bench["weights_gib"] * 2**30, rel=1e-3)  # the planner's weights
    f = projection.factors("h200")
    floor = shape.prefill_flops(measured["prompt_tokens"]) / f.flops
    assert f.prefill * floor == pytest.approx(run["fresh_s"])
    assert 1 < f.prefill < 3 and f.decode > 1  # slower than the floors, as measured
    peak = shape.weights_bytes + shape.kv_bytes_per_token * measured["prompt_tokens"] + f.activation_bytes
    assert peak == pytest.approx(run["second_half_peak_gib"] * 2**30, rel=1e-3)


@pytest.fixture(scope="module")
def flagship():
    config, _ = load_config(FLAGSHIP)
    return config


def test_flagship_grid_in_nf4_fits_one_h200_and_refuses_bf16_with_the_reason(flagship):
    nf4 = plan(flagship, context=262144, quant="nf4")
    assert nf4.kv.bytes_per_token == 23040
    rows = projection.project_grid(nf4, flagship, [8192, 32768, 131072, 262144], (0, 25, 50, 75, 100), 1, True,
                                   32, "h200")
    assert all(r.fits for r in rows) and [r.cells for r in rows] == [6] * 4
    longest = rows[-1]  # 5 depths + control decode as 6 rows of batch 8, each a copy of the 256k cache
    assert longest.decode_rows == 6 and longest.kv_cache_bytes == 7 * 23040 * 262144
    assert longest.peak_bytes == nf4.weights_bytes + 7 * 23040 * 262144 + projection.factors("h200", "nf4").activations(
        262144 - 32)
    assert longest.peak_bytes <= 127e9  # issue 15: a 256k cell with >= 10% of the H200 free
    assert longest.prefill_s > rows[-2].prefill_s > rows[0].prefill_s  # attention grows with the square
    bf16 = plan(flagship, context=262144, quant="none")
    refused = projection.project_grid(bf16, flagship, [262144], (50,), 1, True, 32, "h200")[0]
    assert not refused.fits and "of 135.7 GB usable on one NVIDIA H200" in refused.reason
    text = projection.table([longest, refused], "h200")
    assert "refused: length 262144: needs 258" in text and "in benchmarks/results/gpu_engine_h200" in text


def test_an_unknown_gpu_and_a_bad_token_count_are_named():
    with pytest.raises(MemoryPlanError, match=r"no measured factors for the GPU 'a100'; ragkit has them for h200"):
        projection.resolve_gpu("a100")
    assert projection.resolve_gpu("NVIDIA H200") == "h200"
    assert projection.parse_tokens("256k") == 262144
    with pytest.raises(MemoryPlanError, match=r"cannot read the token count '256kb'"):
        projection.parse_tokens("256kb")


def test_ragkit_plan_projects_a_context_on_a_named_gpu():
    result = CliRunner().invoke(app, ["plan", FLAGSHIP, "--context", "256k", "--gpu", "h200"])
    assert result.exit_code == 0, result.output
    assert "KV cache, 262,144 tokens" in result.output and "Projected on one NVIDIA H200" in result.output
    refused = CliRunner().invoke(app, ["plan", FLAGSHIP, "--context", "256k", "--quant", "none", "--gpu", "h200"])
    assert refused.exit_code == 2 and "refused: length 262144" in refused.output


def test_without_a_gpu_the_projection_asks_for_one():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the projection uses it")
    result = CliRunner().invoke(app, ["plan", FLAGSHIP, "--context", "256k", "--project"])
    assert result.exit_code == 2
    assert "there is no CUDA GPU on this machine to project for; name one with --gpu (h200" in result.output


def test_nf4_projects_the_measured_4_layer_nf4_grid_within_its_tolerance(repo_root, tmp_path):
    """--plan on the 4-layer real-width Mistral-4 in NF4 (the H200 run of benchmarks/gpu_engine.py nf4), its
    lengths in the order they ran: each length's wall time within issue 15's 25% of what was measured (128k was
    +26% while prefill time was taken as linear in the tokens fed), and each peak at or above the measured one,
    within 10% (activations grow with the prompt: MLA expands a layer's cached latents)."""
    measured = projection.gpu_table()["h200"]["measured"]["nf4"]
    bench = json.loads((repo_root / measured["source"].split(",")[0]).read_text())
    full = json.loads((repo_root / "ragkit" / "configs" / "mistralai--Mistral-Small-4-119B-2603.json").read_text())
    full["text_config"]["num_hidden_layers"] = bench["layers"]
    (tmp_path / "config.json").write_text(json.dumps(full))
    config, _ = load_config(tmp_path)
    grid = bench["grid"]  # 32k, 256k, 128k: the first carries the first grid's one-time excess
    rows = projection.project_grid(plan(config, context=max(g["length"] for g in grid), quant="nf4"), config,
                                   [g["length"] for g in grid], bench["args"]["depths"], 1, True,
                                   bench["args"]["max_new"], "h200")
    assert projection.factors("h200", "nf4").quant == "nf4" and projection.factors("h200", "int8").quant == "none"
    for row, got in zip(rows, grid):
        assert row.seconds == pytest.approx(got["wall_s"], rel=0.25), row.length
        assert got["peak_gib"] * 2**30 <= row.peak_bytes <= 1.10 * got["peak_gib"] * 2**30, row.length


def test_decode_rows_are_the_runners_batch_within_half_the_free_memory():
    assert projection.decode_rows(6, 1, 10**12, 10**9) == 0  # batch size 1: each cell decodes on the shared cache
    assert projection.decode_rows(6, 8, 10**12, 10**9) == 6 and projection.decode_rows(12, 8, 10**12, 10**9) == 8
    assert projection.decode_rows(6, 8, 5 * 10**9, 10**9) == 2  # 2.5 GB of rows fit: two
    assert projection.decode_rows(6, 8, 10**9, 10**9) == 1  # at least one row, as the runner takes
