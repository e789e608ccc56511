"""--reasoning none|high on the suites: a settings field hashed only when set (committed runs keep their cell ids),
prompts exact to the token with the template's own [MODEL_SETTINGS] block, rows with the raw answer beside the
scored one, and a clear refusal for a model whose template has no reasoning mode."""

from __future__ import annotations

import json

import pytest

from evals.core.errors import SettingsError
from evals.core.spec import config_hash
from evals.core.targets import wrap
from evals.lost_in_middle import suite as lost_in_middle
from evals.needle import suite as needle
from ragkit import LocalLLM

COMMITTED_NEEDLE = "benchmarks/results/haystack_start_2k/fixed/run.json"
COMMITTED_LITM = "benchmarks/results/litm_default_smollm2/run.json"


def _committed(repo_root, path):
    run = json.loads((repo_root / path).read_text())
    settings = {k: v for k, v in run["settings"].items() if k not in ("recipe_version", "pool", "qa_fingerprint")}
    extra = {k: run["settings"][k] for k in ("pool", "qa_fingerprint") if k in run["settings"]}
    return run, settings, extra


def test_without_reasoning_committed_runs_keep_their_configuration(repo_root):
    run, settings, extra = _committed(repo_root, COMMITTED_NEEDLE)
    s = needle.NeedleSettings(**settings)
    assert "reasoning" not in s.hashed()
    assert config_hash({**s.hashed(), **extra}) == run["config"]
    run, settings, extra = _committed(repo_root, COMMITTED_LITM)
    s = lost_in_middle.LitmSettings(**settings)
    assert "reasoning" not in s.hashed()
    assert config_hash({**s.hashed(), **extra}) == run["config"]


def test_reasoning_is_hashed_when_set_and_its_budget_counts_the_thinking():
    plain, _ = needle.settings_from_args(["--lengths", "2k"])
    none, _ = needle.settings_from_args(["--lengths", "2k", "--reasoning", "none"])
    high, _ = needle.settings_from_args(["--lengths", "2k", "--reasoning", "high"])
    assert len({config_hash(s.hashed()) for s in (plain, none, high)}) == 3
    assert (plain.max_new_tokens, none.max_new_tokens, high.max_new_tokens) == (32, 32, 32 + 1024)
    assert lost_in_middle.settings_from_args(["--reasoning", "high"]).max_new_tokens == 48 + 1024  # kv: 48
    with pytest.raises(SettingsError, match=r"--reasoning 'medium' is unknown; choose one of none, high"):
        needle.NeedleSettings(lengths="2k", reasoning="medium")
    with pytest.raises(SettingsError, match=r"--reasoning applies to the in-process backend"):
        needle.NeedleSettings(lengths="2k", reasoning="high", backend="openai")


def test_a_model_without_reasoning_mode_is_refused_with_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert needle.main(["--lengths", "1k", "--reasoning", "high", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--reasoning: the chat template of" in err and "has no reasoning mode" in err
    assert not (out / "results.jsonl").exists()
    litm = tmp_path / "litm"
    assert lost_in_middle.main(["--reasoning", "none", "--questions", "1", "--out", str(litm), "--no-progress"]) == 2
    assert "has no reasoning mode" in capsys.readouterr().err and not (litm / "results.jsonl").exists()


@pytest.fixture(scope="module")
def tekken_model(tiny_mistral4_tekken_dir):
    return LocalLLM(tiny_mistral4_tekken_dir, dtype="float32")


@pytest.mark.parametrize("effort", ["none", "high"])
def test_needle_cells_are_exact_with_the_template_tokens_and_keep_the_raw_answer(tiny_mistral4_tekken_dir, tekken_model,
                                                                                 tmp_path, effort, monkeypatch):
    monkeypatch.chdir(tiny_mistral4_tekken_dir.parent)  # run.json keeps --model relative to the cwd (portable)
    llm = LocalLLM.from_pretrained_objects(tekken_model.model, tekken_model.tokenizer, reasoning_effort=effort)
    s, _ = needle.settings_from_args(["--lengths", "1k", "--depths", "0,100", "--max-new-tokens", "6",
                                      "--model", str(tiny_mistral4_tekken_dir),
                                      "--reasoning", effort, "--out", str(tmp_path / effort), "--no-progress"])
    out = needle.execute(s, wrap(llm, "tiny-mistral4-tekken"))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and json.loads((out / "run.json").read_text())["settings"]["reasoning"] == effort
    for row in rows:
        if row["kind"] == "needle":  # the [MODEL_SETTINGS] block counted like every template token
            assert row["prompt_tokens"] == 1024 - 6
        assert 0 <= row["reasoning_tokens"] <= row["answer_tokens"] <= 6
        assert row["answer"] in row["raw_answer"]
        assert row["reasoning_closed"] or row["answer"] == ""
    text = needle.rebuild_prompt(str(out), rows[0]["cell_id"])  # the recipe rebuilds with the same effort
    assert text.startswith(f'<s>[MODEL_SETTINGS]{{"reasoning_effort": "{effort}"}}[/MODEL_SETTINGS][INST]')
