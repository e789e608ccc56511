"""--adapter on the suites: the adapter's identity is in run.json and the configuration hash (absent, the hash
is what committed runs have), and a bad adapter stops the command before any cell runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from evals.core import compare as cmp
from evals.lost_in_middle import suite as lost_in_middle
from evals.needle import suite as needle
from evals.core.errors import SettingsError
from evals.core.portable import portable_path
from evals.core.spec import config_hash
from evals.core.targets import wrap

COMMITTED = "benchmarks/results/haystack_start_2k/fixed/run.json"


def _smollm2_adapter(path, seed=0, layers=30):
    """A LoRA on SmolLM2's q_proj (576 -> 576, rank 2), written the way PEFT writes one."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
         "lora_dropout": 0.0, "bias": "none"}))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(2, 576, generator=g) * 0.05
        tensors[f"{key}.lora_B.weight"] = torch.randn(576, 2, generator=g) * 0.05
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def test_no_adapter_keeps_the_committed_configuration_hash(repo_root):
    run = json.loads((repo_root / COMMITTED).read_text())
    s, _ = needle.settings_from_args(["--lengths", "2k", "--seeds", "1,2,3,4,5,6,7,8,9,10"])
    assert config_hash({**s.hashed(), "pool": run["settings"]["pool"]}) == run["config"]
    assert "adapter" not in s.hashed()


def test_adapter_identity_is_hashed_not_its_path(tmp_path):
    a = _smollm2_adapter(tmp_path / "a", seed=1)
    b = _smollm2_adapter(tmp_path / "b", seed=2)
    moved = shutil.copytree(a, tmp_path / "elsewhere" / "a")
    base, _ = needle.settings_from_args(["--lengths", "1k"])
    with_a, _ = needle.settings_from_args(["--lengths", "1k", "--adapter", str(a)])
    with_moved, _ = needle.settings_from_args(["--lengths", "1k", "--adapter", str(moved)])
    with_b, _ = needle.settings_from_args(["--lengths", "1k", "--adapter", str(b)])
    with_ab, _ = needle.settings_from_args(["--lengths", "1k", "--adapter", str(a), str(b)])
    hashes = [config_hash(s.hashed()) for s in (base, with_a, with_b, with_ab)]
    assert len(set(hashes)) == 4
    assert config_hash(with_moved.hashed()) == hashes[1]
    litm = lost_in_middle.settings_from_args(["--adapter", str(a)])
    assert litm.hashed()["adapter"] == with_a.hashed()["adapter"]


def test_bad_adapter_fails_before_the_run_directory_is_made(tmp_path, capsys):
    out = tmp_path / "run"
    assert needle.main(["--lengths", "512", "--adapter", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert f"--adapter: adapter {tmp_path / 'nowhere'}: not a directory" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SettingsError, match="--adapter applies to the in-process backend"):
        needle.settings_from_args(["--lengths", "512", "--backend", "openai", "--adapter", str(tmp_path)])


def test_wrong_shape_adapter_stops_the_suite_before_any_cell(tmp_path, capsys):
    bad = _smollm2_adapter(tmp_path / "bad")
    from safetensors.torch import load_file, save_file

    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"] = torch.zeros(192, 2)
    save_file(tensors, bad / "adapter_model.safetensors")
    out = tmp_path / "run"
    assert needle.main(["--lengths", "512", "--adapter", str(bad), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"adapter {bad}: module model.layers.3.self_attn.q_proj has lora_A (2, 576) and lora_B (192, 2)" in err
    assert not (out / "results.jsonl").exists()


@pytest.mark.slow  # real SmolLM2 suite runs: minutes on 2 cores; run with --run-slow
def test_base_and_adapter_runs_compare_cell_by_cell(tmp_path, smollm2):
    adapter = _smollm2_adapter(tmp_path / "adapter", seed=3)
    flags = ["--lengths", "384", "--depths", "50%", "--no-controls", "--no-progress", "--haystack", "corpora/sqlite"]
    base_s, _ = needle.settings_from_args([*flags, "--out", str(tmp_path / "base")])
    base = needle.execute(base_s, target=wrap(smollm2))
    cand_s, _ = needle.settings_from_args([*flags, "--out", str(tmp_path / "cand"), "--adapter", str(adapter)])
    cand = needle.execute(cand_s)
    base_run, cand_run = (json.loads((d / "run.json").read_text()) for d in (base, cand))
    assert base_run["config"] != cand_run["config"]
    [identity] = cand_run["model"]["adapters"]
    assert identity["path"] == portable_path(adapter, cand)  # run.json carries no machine path (evals.core.portable)
    assert identity["r"] == 2 and identity["target_modules"] == ["q_proj"]
    assert cand_run["settings"]["adapter"] == [{k: identity[k] for k in ("sha256", "config_sha256")}]
    assert "adapters" not in base_run["model"] and "adapter" not in base_run["settings"]
    result = cmp.compare("needle", base, cand)
    assert result.invalid is None and result.overall.n == 1
