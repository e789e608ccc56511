"""The memory planner against hand-computed formulas and against memory measured on loaded models."""

from __future__ import annotations

import gc

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragkit.errors import MemoryPlanError, ModelNotFoundError, QuantizationError
from ragkit.planner import parse_gpus, plan

MS4 = Path(__file__).resolve().parents[1] / "fixtures" / "mistral_small_4_config.json"
GiB = 2**30


@pytest.fixture(scope="module")
def ms4():
    """Mistral-Small-4 in ragkit's NF4 at 262,144 tokens on two 80 GiB GPUs."""
    return plan(MS4, context=262_144, quant="nf4", gpus="2x80GiB")


@pytest.fixture(scope="module")
def ms4_stock():
    return plan(MS4, context=262_144, quant="nf4", moe_experts="stock")


# ------------------------------------------------------------------ Mistral-Small-4 seed figures
def test_mistral_small_4_parameters_match_the_published_model(ms4):
    text = ms4.params - ms4.params_vision
    assert round(text / 1e9, 2) == 118.97
    assert ms4.params_routed_experts / text == pytest.approx(0.975, abs=0.0005)
    assert round(ms4.params / 1e9, 1) == 119.4  # with the Pixtral vision tower, as the model card says


def test_mistral_small_4_weights_reproduce_the_seed_figures(ms4):
    w = ms4.weights_by_precision
    assert 235e9 <= w["none/ragkit"] <= 245e9  # "about 240 GB at 16-bit"
    assert 115e9 <= w["int8/all"] <= 130e9  # "about 125 GB at 8-bit" (every matmul weight in int8)
    assert 60e9 <= ms4.weights_bytes == w["nf4/ragkit"] <= 70e9  # "65-70 GB at 4-bit", at most 70 GB
    assert 225e9 <= w["nf4/stock"] <= 240e9  # what stock bitsandbytes really needs: "about 230 GB"
    assert w["int8/ragkit"] == w["int8/stock"]  # ragkit's expert-aware path is NF4 only


def test_stock_bitsandbytes_plan_says_the_experts_stay_16_bit_and_why(ms4_stock):
    experts = next(g for g in ms4_stock.groups if g.name.startswith("routed experts"))
    assert experts.storage == "bfloat16"
    assert experts.bytes == experts.params * 2
    assert "not nn.Linear" in experts.why
    table = ms4_stock.table()
    assert "MoE experts: stock bitsandbytes" in table
    assert "stay 16-bit" in table


def test_ragkit_plan_quantizes_experts_and_keeps_embeddings_and_lm_head_16_bit(ms4):
    rows = {g.name: g for g in ms4.groups}
    assert rows["routed experts (3-D)"].storage == "nf4 + absmax"
    assert rows["routed experts (3-D)"].bytes / rows["routed experts (3-D)"].params == pytest.approx(0.5159, abs=1e-3)
    assert rows["embeddings"].storage == rows["nn.Linear kept 16-bit"].storage == "bfloat16"
    assert rows["nn.Linear kept 16-bit"].params == 131072 * 4096  # lm_head (not tied in Mistral-Small-4)


# ------------------------------------------------------------------ KV cache by formula
def test_mla_kv_cache_is_the_compressed_latent_by_formula(ms4):
    layers, kv_lora_rank, rope, heads, nope, v = 36, 256, 64, 32, 64, 128
    assert ms4.kv.kind == "MLA latent"
    assert ms4.kv.bytes_per_token == layers * (kv_lora_rank + rope) * 2 == 23_040
    assert ms4.kv_cache_bytes == 23_040 * 262_144
    assert ms4.kv.alternatives["decompressed K/V of all heads"] == layers * heads * ((nope + rope) + v) * 2
    assert ms4.workspace_bytes == heads * ((nope + v) + (nope + rope)) * 2 * 262_144


def _tiny_mistral_config(**kw) -> dict:
    from transformers import MistralConfig

    base = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
    return MistralConfig(**{**base, **kw}).to_dict()


def test_gqa_kv_cache_by_formula():
    p = plan(_tiny_mistral_config(), context=1000, batch=3, quant="none", dtype="float32")
    assert p.kv.kind == "GQA"
    assert p.kv.bytes_per_token == 2 * 3 * 2 * 16 * 4
    assert p.kv_cache_bytes == 2 * 3 * 2 * 16 * 4 * 1000 * 3
    assert p.workspace_bytes == 0
    assert plan(_tiny_mistral_config(), context=10, quant="nf4").kv.bytes_per_token == 2 * 3 * 2 * 16 * 2  # bf16


def _cache_bytes_per_token(model, tokens: int) -> float:
    import torch

    with torch.no_grad():
        out = model(torch.arange(tokens)[None] + 5, use_cache=True)
    cache = out.past_key_values
    total = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return total / tokens


def test_planned_kv_per_token_equals_what_transformers_caches(tiny_mistral4_dir, tiny_mistral_bf16_dir):
    from transformers import AutoConfig

    from ragkit.models import model_class

    for directory in (tiny_mistral4_dir, tiny_mistral_bf16_dir):
        config = AutoConfig.from_pretrained(directory)
        model = model_class(config).from_pretrained(directory, dtype="bfloat16")
        assert _cache_bytes_per_token(model, 7) == plan(directory, quant="nf4").kv.bytes_per_token


# ------------------------------------------------------------------ per-GPU split
def test_split_over_two_gpus_sums_to_the_plan_and_keeps_headroom(ms4):
    assert [g.capacity for g in ms4.gpus] == [80 * GiB, 80 * GiB]
    assert sum(g.weights for g in ms4.gpus) == ms4.weights_bytes
    assert sum(g.kv_cache for g in ms4.gpus) == ms4.kv_cache_bytes
    for g in ms4.gpus:
        assert g.usable == int(80 * GiB * (1 - 0.12))
        assert g.total <= g.usable
        assert g.weights <= g.max_memory == ms4.max_memory[g.index]
    layers = [i for g in ms4.gpus for i in range(g.layers[0], g.layers[1] + 1)]
    assert layers == list(range(36))  # every decoder layer once, in order
    assert set(ms4.device_map.values()) == {0, 1}


def test_bitsandbytes_max_memory_accounts_for_transformers_scaling():
    """transformers scales max_memory by 0.9 under bitsandbytes: the planned weights must fit after that."""
    p = plan(_tiny_mistral_config(num_hidden_layers=12, hidden_size=512, intermediate_size=2048), quant="int8",
             context=4096, gpus=["40MiB", "40MiB"])
    assert sum(g.weights for g in p.gpus) == p.weights_bytes
    for g in p.gpus:
        assert g.weights <= g.max_memory * 0.9 <= g.usable - g.kv_cache


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_transformers_device_map_auto_keeps_every_module_on_the_planned_gpus(quant):
    """transformers' own device_map="auto" placement, given the planned max_memory, needs no CPU or disk."""
    import torch
    from transformers import BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear
    from transformers.integrations.accelerate import _get_device_map
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

    from ragkit.models import model_class
    from ragkit.placement import load_config

    p = plan(MS4, quant=quant, context=262_144, gpus="4x80GiB")
    config, _ = load_config(MS4)
    with torch.device("meta"):
        model = model_class(config).from_config(config, dtype=torch.bfloat16)
    quantizer = None
    if quant == "int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
        replace_with_bnb_linear(model, modules_to_not_convert=get_keys_to_not_convert(model), quantization_config=bnb)
        quantizer = Bnb8BitHfQuantizer(bnb)
    device_map = _get_device_map(model, "auto", dict(p.max_memory), quantizer)
    assert set(device_map.values()) <= {0, 1, 2, 3}


@pytest.mark.parametrize("model, gpus", [(MS4, "4x77GiB"), ("default", "2x1GiB")])
def test_planned_device_map_places_every_parameter_within_budget(model, gpus):
    """plan.device_map can be passed as from_pretrained(device_map=...): it covers every parameter (tied ones on
    their source's GPU) and no GPU gets more weights than its budget (4x76GiB would not fit Mistral-Small-4)."""
    import torch

    from ragkit.models import model_class
    from ragkit.placement import load_config

    p = plan(model, quant="int8", context=262_144 if model == MS4 else 8192, gpus=gpus)
    config, _ = load_config(model)
    with torch.device("meta"):
        meta = model_class(config).from_config(config)
    for name, _param in meta.named_parameters(remove_duplicate=False):
        owners = [key for key in p.device_map if name.startswith(key + ".")]
        assert len(owners) == 1, name
    if meta.get_output_embeddings() is not None and config.get_text_config().tie_word_embeddings:
        out = next(n for n, m in meta.named_modules() if m is meta.get_output_embeddings())
        inp = next(n for n, m in meta.named_modules() if m is meta.get_input_embeddings())
        assert p.device_map[out] == p.device_map[inp]
    for g in p.gpus:
        assert g.weights <= 0.9 * g.max_memory and g.total <= g.usable


def test_more_headroom_leaves_more_free():
    small = plan(MS4, context=8192, quant="nf4", gpus="3x40GiB", headroom=0.3)
    assert all(g.usable == int(40 * GiB * 0.7) and g.total <= g.usable for g in small.gpus)
    assert sum(g.weights for g in small.gpus) == small.weights_bytes


def test_plan_from_the_package_is_the_function_even_after_the_module_was_imported():
    import ragkit
    import ragkit.planner  # noqa: F401
    from ragkit import plan as from_package

    assert from_package is ragkit.planner.plan
    assert from_package(_tiny_mistral_config(), context=8, quant="none").kv.bytes_per_token == 2 * 3 * 2 * 16 * 4


def test_gpu_specs_are_parsed():
    assert parse_gpus("3x24GiB") == [24 * GiB] * 3
    assert parse_gpus("80GiB, 24GB") == [80 * GiB, 24 * 10**9]
    assert parse_gpus([10**9, "1GiB"]) == [10**9, GiB]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("spec", ["3x", "24 potatoes", "0x24GiB", "x24GiB", "", "-8GiB", "3x24GiB,"])
def test_malformed_gpus_are_refused_with_an_example(spec):
    with pytest.raises(MemoryPlanError, match="3x24GiB") as err:
        parse_gpus(spec)
    assert repr(spec) in str(err.value)


def test_unknown_quantization_names_it_and_the_choices():
    with pytest.raises(QuantizationError, match=r"'nf3'.*nf4, int8, none"):
        plan(MS4, quant="nf3")


@pytest.mark.parametrize("kw, match", [
    ({"moe_experts": "all"}, "moe_experts 'all'"),
    ({"headroom": 1.0}, "headroom"),
    ({"context": 0}, "context"),
    ({"dtype": "float8"}, "float8"),
])
def test_bad_options_are_refused(kw, match):
    with pytest.raises(MemoryPlanError, match=match):
        plan(MS4, **kw)


def test_impossible_fit_says_what_is_needed_and_what_to_change():
    with pytest.raises(MemoryPlanError) as err:
        plan(MS4, quant="none", context=262_144, gpus="3x24GiB")
    msg = str(err.value)
    assert "does not fit on 3 GPU(s)" in msg and "weights 238.80 GB" in msg and "KV cache 6.04 GB" in msg
    assert "quant='nf4' (weights 63.22 GB" in msg


def test_stock_experts_that_do_not_fit_point_to_ragkit_nf4():
    with pytest.raises(MemoryPlanError, match="moe_experts='ragkit'"):
        plan(MS4, quant="nf4", moe_experts="stock", context=32_768, gpus="2x80GiB")


def test_unknown_model_and_config_without_model_type(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found offline"):
        plan(tmp_path / "missing-model")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(MemoryPlanError, match="model_type"):
        plan(bad)


# ------------------------------------------------------------------ the command
def _ragkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ragkit.cli", *args], capture_output=True, text=True, timeout=300)


def test_plan_command_prints_the_table():
    run = _ragkit("plan", str(MS4), "--quant", "nf4", "--gpus", "2x80GiB", "--context", "262144")
    assert run.returncode == 0, run.stderr
    assert "Per-GPU split (headroom 12%)" in run.stdout
    assert "23,040 B" in run.stdout and "max_memory={0:" in run.stdout


def test_plan_of_the_flagship_by_hub_id_works_offline_on_a_fresh_machine(tmp_path):
    """No hub cache at all: the config ragkit ships for the model its docs name is used, titled by the id."""
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty-hub"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "ragkit.cli", "plan", "mistralai/Mistral-Small-4-119B-2603",
                          "--quant", "nf4"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert "Memory plan: mistralai/Mistral-Small-4-119B-2603 (Mistral3ForConditionalGeneration)" in run.stdout


def test_a_cached_hub_config_is_titled_by_its_model_id_and_an_uncached_id_says_config_json_suffices(tmp_path):
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(MS4.read_text())
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "ragkit.cli", "plan", "acme/tiny"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert "Memory plan: acme/tiny (" in run.stdout and "0" * 40 not in run.stdout
    run = subprocess.run([sys.executable, "-m", "ragkit.cli", "plan", "acme/absent"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 2 and run.stderr.startswith("Error: "), run.stderr
    assert "hf download acme/absent config.json" in run.stderr


def test_plan_command_fails_cleanly_on_bad_gpus():
    run = _ragkit("plan", str(MS4), "--gpus", "3x")
    assert run.returncode == 2
    assert "Error: Cannot read the GPU list '3x'" in run.stderr and "Traceback" not in run.stderr


# ------------------------------------------------------------------ planned vs measured
def _measured(model) -> tuple[int, int]:
    """(get_memory_footprint, bytes really held incl. bitsandbytes quant states and int8 row scales)."""
    import bitsandbytes as bnb

    from ragkit.quant.footprint import measure_footprint

    scales = sum(m.weight.SCB.nbytes for m in model.modules()
                 if isinstance(m, bnb.nn.Linear8bitLt) and m.weight.SCB is not None)
    return model.get_memory_footprint(), measure_footprint(model).nbytes + scales


def _assert_plan_matches(model, p) -> None:
    footprint, held = _measured(model)
    assert p.footprint_bytes == pytest.approx(footprint, rel=0.03)
    assert p.weights_bytes == pytest.approx(held, rel=0.03)


@pytest.fixture(scope="module")
def tiny_mistral_bf16_dir(tmp_path_factory):
    """A random tiny MistralConfig model saved as BF16 safetensors (tiny_mistral4_dir is in conftest)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-mistral")
    MistralForCausalLM(MistralConfig(**_tiny_mistral_config())).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("quant", [None, "nf4", "int8"])
def test_tiny_mistral_planned_equals_measured(tiny_mistral_bf16_dir, quant):
    from ragkit import LocalLLM

    llm = LocalLLM(str(tiny_mistral_bf16_dir), tokenizer="default", quantization=quant, device_map="cpu")
    _assert_plan_matches(llm.model, plan(tiny_mistral_bf16_dir, quant=quant or "none"))


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_tiny_mistral4_moe_through_localllm_planned_equals_measured(tiny_mistral4_dir, quant):
    """LocalLLM's nf4 on a fused-experts model is ragkit's expert-aware NF4: moe_experts='ragkit'."""
    from ragkit import LocalLLM

    llm = LocalLLM(str(tiny_mistral4_dir), tokenizer="default", quantization=quant, device_map="cpu")
    _assert_plan_matches(llm.model, plan(tiny_mistral4_dir, quant=quant or "none", moe_experts="ragkit"))


def test_tiny_mistral4_stock_bitsandbytes_planned_equals_measured(tiny_mistral4_dir):
    """Stock transformers + BitsAndBytesConfig(load_in_4bit) leaves the experts in bf16, as planned."""
    import torch
    from transformers import AutoModelForImageTextToText

    from ragkit.loading import quantization_config

    model = AutoModelForImageTextToText.from_pretrained(
        tiny_mistral4_dir, quantization_config=quantization_config("nf4"), dtype="bfloat16", device_map="cpu")
    _assert_plan_matches(model, plan(tiny_mistral4_dir, quant="nf4", moe_experts="stock"))
    experts = [m for m in model.modules() if type(m).__name__ == "Mistral4Experts"]
    assert experts and all(m.gate_up_proj.dtype == m.down_proj.dtype == torch.bfloat16 for m in experts)


def test_smollm2_fp32_planned_equals_measured():
    from ragkit import LocalLLM

    llm = LocalLLM("default")
    p = plan("default", quant="none")
    assert p.dtype == "float32"
    _assert_plan_matches(llm.model, p)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_smollm2_bitsandbytes_on_cpu_planned_equals_measured(quant):
    from ragkit import LocalLLM

    llm = LocalLLM("default", quantization=quant, device_map="cpu")
    _assert_plan_matches(llm.model, plan("default", quant=quant))


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "nf4", "int8"])
def test_smollm2_on_cuda_planned_equals_allocated(quant):
    import torch

    from ragkit import LocalLLM

    gc.collect()  # models of earlier tests must be freed now, not during this load (negative deltas)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    llm = LocalLLM("default", quantization=quant, device_map="cuda")
    allocated = torch.cuda.memory_allocated() - before
    assert plan("default", quant=quant or "none").weights_bytes == pytest.approx(allocated, rel=0.03)
    del llm


@pytest.mark.gpu
@pytest.mark.parametrize("moe_experts", ["ragkit", "stock"])
def test_mistral4_moe_nf4_on_cuda_planned_equals_allocated(tmp_path, tiny_mistral_dir, moe_experts):
    """A Mistral-4 MoE big enough (~60 M params) that the CUDA allocator's 512-byte rounding stays well under 1%."""
    import torch
    from transformers import AutoModelForImageTextToText, Mistral3Config, Mistral3ForConditionalGeneration
    from transformers import Mistral4Config, PixtralVisionConfig

    from ragkit import LocalLLM
    from ragkit.loading import quantization_config

    text = Mistral4Config(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=64,
                          num_experts_per_tok=4, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=32,
                          qk_nope_head_dim=32, v_head_dim=64, max_position_embeddings=4096)
    vision = PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=64, patch_size=8, head_dim=32)
    config = Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    Mistral3ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(tmp_path)
    gc.collect()  # models of earlier tests must be freed now, not during this load (negative deltas)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    if moe_experts == "ragkit":
        model = LocalLLM(str(tmp_path), tokenizer=str(tiny_mistral_dir), quantization="nf4", device_map="cuda").model
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            tmp_path, quantization_config=quantization_config("nf4"), dtype="bfloat16", device_map="cuda")
    allocated = torch.cuda.memory_allocated() - before
    assert plan(tmp_path, quant="nf4", moe_experts=moe_experts).weights_bytes == pytest.approx(allocated, rel=0.03)
    del model
