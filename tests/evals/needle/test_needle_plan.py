"""``python -m evals.needle --plan``: the grid's projected memory and time per length, printed before any work (no
run directory, no model loaded), lengths that will not fit refused with exit 2, plan flags not hashed."""

from __future__ import annotations

from evals.core.spec import config_hash
from evals.needle import suite as needle

FLAGSHIP = ["--model", "mistralai/Mistral-Small-4-119B-2603", "--depths", "0,50,100"]


def test_plan_prints_every_length_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--lengths", "32k,128k,256k", *FLAGSHIP, "--quant", "nf4", "--plan", "--gpu", "h200", "--out", str(out)]
    assert needle.main(argv) == 0
    text = capsys.readouterr().out
    assert "needle grid: 3 lengths x 3 depths x 1 seeds + controls, 32 new tokens per cell" in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["32768"], ["131072"], ["262144"])]
    assert [r[0] for r in rows] == ["32768", "131072", "262144"] and all(r[8] == "yes" for r in rows)
    assert [r[1] for r in rows] == ["4"] * 3  # 3 depths + the control
    assert not out.exists()


def test_lengths_that_will_not_fit_are_refused_with_the_reason(tmp_path, capsys):
    argv = ["--lengths", "32k,256k", *FLAGSHIP, "--plan", "--gpu", "h200", "--out", str(tmp_path / "run")]
    assert needle.main(argv) == 2  # bf16: 239 GB of weights
    captured = capsys.readouterr()
    assert "refused: length 262144: needs" in captured.out and "usable on one NVIDIA H200" in captured.out
    assert "length(s) 32768, 262144 will not fit on one GPU" in captured.err and "--quant nf4" in captured.err
    assert needle.main(["--lengths", "32k", *FLAGSHIP, "--plan", "--gpu", "a100"]) == 2
    assert "no measured factors for the GPU 'a100'" in capsys.readouterr().err


def test_plan_flags_do_not_change_the_configuration_hash():
    plain, _ = needle.settings_from_args(["--lengths", "2k"])
    planned, _ = needle.settings_from_args(["--lengths", "2k", "--plan", "--gpu", "h200"])
    assert config_hash(plain.hashed()) == config_hash(planned.hashed())
