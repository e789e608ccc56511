"""LoRA adapters on the embedded SmolLM2 (fp32 and NF4): the same logits as PEFT's own PeftModel; bad adapters
fail before any weight loads, naming the adapter and the mismatch."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from ragkit import AdapterError, LocalLLM, loading, models
from ragkit.adapters import check_against, read_adapters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def base_dir():
    return models.local_dir(models.resolve_llm("default"))


def _make_adapter(model, out, seed, targets=TARGETS, r=4):
    """A PEFT LoRA with random (non-zero) A and B, so it changes the outputs; saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # random B has std 1 in PEFT's init; scale it to a small update that still moves logits
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.02)
    peft_model.save_pretrained(out)
    return peft_model


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def adapters(base_dir, smollm2, tmp_path_factory):
    """Two random adapters on SmolLM2, and the fp32 PeftModel logits of the first with the base's."""
    root = tmp_path_factory.mktemp("adapters")
    ids = smollm2.encode_prompt(smollm2.chat_prompt(PROMPT))
    base = loading.load_model(base_dir, dtype="float32", device_map="cpu")
    first = _make_adapter(base, root / "a", seed=1)
    expected = _logits(first, ids)
    with first.disable_adapter():
        plain = _logits(first, ids)
    second = _make_adapter(loading.load_model(base_dir, dtype="float32", device_map="cpu"), root / "b", seed=2,
                           targets=["q_proj", "v_proj"], r=2)
    del first, second, base
    gc.collect()
    return {"a": root / "a", "b": root / "b", "ids": ids, "expected": expected, "plain": plain}


@pytest.mark.slow  # PEFT reference models on SmolLM2 (fp32 and NF4): minutes on 2 cores
def test_fp32_adapter_matches_peft(adapters):
    llm = LocalLLM("default", dtype="float32", adapter=adapters["a"])
    got = _logits(llm.model, adapters["ids"])
    assert (adapters["expected"] - adapters["plain"]).abs().max() > 0.5  # the adapter does change the outputs
    torch.testing.assert_close(got, adapters["expected"], atol=1e-4, rtol=1e-4)
    [identity] = llm.adapters
    assert identity["r"] == 4 and identity["target_modules"] == sorted(TARGETS) and len(identity["sha256"]) == 64


@pytest.mark.slow  # PEFT reference models on SmolLM2 (fp32 and NF4): minutes on 2 cores
def test_merged_adapter_matches_unmerged(adapters):
    llm = LocalLLM("default", dtype="float32", adapter=adapters["a"], merge_adapter=True)
    assert not any("lora" in n for n, _ in llm.model.named_modules())  # folded into the weights
    torch.testing.assert_close(_logits(llm.model, adapters["ids"]), adapters["expected"], atol=1e-3, rtol=1e-3)


@pytest.mark.slow  # PEFT reference models on SmolLM2 (fp32 and NF4): minutes on 2 cores
def test_two_adapters_add_their_updates(adapters, base_dir):
    """Both adapters active: the logits of the base with W + s_a B_a A_a + s_b B_b A_b, merged here by hand."""
    from safetensors.torch import load_file

    llm = LocalLLM("default", dtype="float32", adapter=[adapters["a"], adapters["b"]])
    base = loading.load_model(base_dir, dtype="float32", device_map="cpu")
    modules = dict(base.named_modules())
    for key in ("a", "b"):
        config = json.loads((adapters[key] / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        tensors = load_file(adapters[key] / "adapter_model.safetensors")
        for name, a in tensors.items():
            if ".lora_A." in name:
                b = tensors[name.replace(".lora_A.", ".lora_B.")]
                module = modules[name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")]
                with torch.no_grad():
                    module.weight += scale * (b @ a)
    torch.testing.assert_close(_logits(llm.model, adapters["ids"]), _logits(base, adapters["ids"]),
                               atol=1e-3, rtol=1e-3)
    assert len(llm.adapters) == 2


@pytest.mark.slow  # PEFT reference models on SmolLM2 (fp32 and NF4): minutes on 2 cores
def test_nf4_adapter_matches_peft(adapters, base_dir):
    from peft import PeftModel

    reference = PeftModel.from_pretrained(loading.load_model(base_dir, quantization="nf4", compute_dtype="float32",
                                                            device_map="cpu"), adapters["a"])
    expected = _logits(reference, adapters["ids"])
    with reference.disable_adapter():
        plain = _logits(reference, adapters["ids"])
    del reference
    gc.collect()
    llm = LocalLLM("default", quantization="nf4", compute_dtype="float32", adapter=adapters["a"])
    assert type(llm.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert (expected - plain).abs().max() > 0.5
    torch.testing.assert_close(_logits(llm.model, adapters["ids"]), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # PEFT reference models on SmolLM2 (bf16 and int8): minutes on 2 cores
@pytest.mark.parametrize("kw, layer", [({"dtype": "bfloat16"}, "Linear"),
                                       ({"quantization": "int8", "compute_dtype": "float32"}, "Linear8bitLt")])
def test_bf16_and_int8_adapters_match_peft(adapters, base_dir, kw, layer):
    """The other two bases the issue names: LocalLLM's adapter gives PeftModel's logits on the same base."""
    from peft import PeftModel

    reference = PeftModel.from_pretrained(loading.load_model(base_dir, device_map="cpu", **kw), adapters["a"])
    expected = _logits(reference, adapters["ids"])
    with reference.disable_adapter():
        plain = _logits(reference, adapters["ids"])
    del reference
    gc.collect()
    llm = LocalLLM("default", adapter=adapters["a"], **kw)
    assert type(llm.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == layer
    assert (expected - plain).abs().max() > 0.5
    torch.testing.assert_close(_logits(llm.model, adapters["ids"]), expected, atol=1e-4, rtol=1e-4)


def test_merge_on_quantized_base_is_refused_before_loading(adapters):
    with pytest.raises(AdapterError, match=r"adapter .*/a: merge needs an unquantized base"):
        LocalLLM("default", quantization="nf4", adapter=adapters["a"], merge_adapter=True)


# ---------------------------------------------------------------- bad adapters


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_and_pickle_adapters(tmp_path, adapters):
    with pytest.raises(AdapterError, match=r"adapter .*nowhere: not a directory"):
        LocalLLM("default", adapter=tmp_path / "nowhere")
    pickled = _copy(adapters["a"], tmp_path / "pickled")
    weights = pickled / "adapter_model.safetensors"
    weights.rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"adapter .*pickled: no adapter_model.safetensors \(found "
                                           r"adapter_model.bin: pickle files are not loaded\); .*safetensors only"):
        LocalLLM("default", adapter=pickled)


def test_damaged_adapter(tmp_path, adapters):
    damaged = _copy(adapters["a"], tmp_path / "damaged")
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(AdapterError, match=r"adapter .*damaged: adapter_model.safetensors is damaged"):
        LocalLLM("default", adapter=damaged)
    (damaged / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(AdapterError, match=r"peft_type is 'PREFIX_TUNING'; ragkit loads LoRA adapters only"):
        read_adapters(damaged)


def test_adapter_of_another_size_fails_on_the_meta_model(tmp_path, tiny_mistral_dir, base_dir):
    """A LoRA trained on a 64-wide Mistral has the same module names as SmolLM2's but other shapes: refused
    against SmolLM2 built on the meta device, so no base weight is read."""
    small = tmp_path / "small"
    _make_adapter(loading.load_model(tiny_mistral_dir, dtype="float32", device_map="cpu"), small, seed=3)
    with pytest.raises(AdapterError, match=r"adapter .*small: module model.layers.0.\S+ has lora_A "
                                           r"\(4, (64|128)\) .* but the base's .* is \d+ -> \d+ features"):
        check_against(read_adapters(small), loading.empty_model(base_dir))
    with pytest.raises(AdapterError, match=r"trained on a base of another size"):
        LocalLLM("default", adapter=small)


def test_adapter_for_other_target_modules(tmp_path):
    """A GPT-2-style LoRA (c_attn): target modules the Llama-shaped base does not have."""
    from safetensors.torch import save_file

    other = tmp_path / "gpt2_lora"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}))
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 576),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(1728, 4)},
              other / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"adapter .*gpt2_lora: target_modules \['c_attn'\] are not modules of "
                                           r"the base model \(its linear layers are named like .*q_proj"):
        LocalLLM("default", adapter=other)


# ---------------------------------------------------------------- ragkit's expert-aware NF4 MoE path

MOE_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"]


def _word_tokenizer():
    """A word-level tokenizer for the tiny Mistral4 (its 256 ids as words w0..w255)."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, bos_token="w1", eos_token="w2", pad_token="w11")


@pytest.mark.slow  # two NF4 loads of the tiny MoE and a PEFT reference: about a minute on 2 cores
def test_attention_and_shared_expert_adapter_on_the_nf4_moe_path_matches_peft(tiny_mistral4_dir, tmp_path):
    """On ragkit's expert-aware NF4 (fused experts as NF4Experts), LoRA on the MLA attention projections and
    the shared experts (bitsandbytes Linear4bit) gives PeftModel's logits; the fused experts stay as they are."""
    from ragkit.quant import NF4Experts

    ids = [5, 17, 42, 99, 3, 250, 7, 64]
    base = loading.load_model(tiny_mistral4_dir, quantization="nf4", compute_dtype="float32", device_map="cpu")
    reference = _make_adapter(base, tmp_path / "moe", seed=4, targets=MOE_TARGETS)
    expected = _logits(reference, ids)
    with reference.disable_adapter():
        plain = _logits(reference, ids)
    del reference, base
    gc.collect()
    llm = LocalLLM(str(tiny_mistral4_dir), quantization="nf4", compute_dtype="float32", device_map="cpu",
                   tokenizer=_word_tokenizer(), adapter=tmp_path / "moe")
    layer = llm.model.model.language_model.layers[0]
    assert isinstance(layer.mlp.experts, NF4Experts)
    assert type(layer.self_attn.q_a_proj.base_layer).__name__ == "Linear4bit"
    assert type(layer.mlp.shared_experts.up_proj.base_layer).__name__ == "Linear4bit"
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(_logits(llm.model, ids), expected, atol=1e-4, rtol=1e-4)


def _lora_file(path, module, fan_in, fan_out, r=2):
    """A LoRA directory whose one module is ``module`` (shapes as PEFT writes them)."""
    from safetensors.torch import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": [module.rsplit(".", 1)[-1]]}))
    save_file({f"base_model.model.{module}.lora_A.weight": torch.zeros(r, fan_in),
               f"base_model.model.{module}.lora_B.weight": torch.zeros(fan_out, r)},
              path / "adapter_model.safetensors")
    return path


def test_adapter_on_fused_experts_or_a_router_module_is_refused_before_loading(tiny_mistral4_dir, tmp_path):
    experts = _lora_file(tmp_path / "experts", "model.language_model.layers.0.mlp.experts", 128, 256)
    with pytest.raises(AdapterError, match=r"adapter .*experts: it targets the fused MoE experts "
                                           r"model.language_model.layers.0.mlp.experts; .*take no adapter"):
        LocalLLM(str(tiny_mistral4_dir), quantization="nf4", tokenizer=_word_tokenizer(), adapter=experts)
    router = _lora_file(tmp_path / "router", "model.language_model.layers.0.mlp.gate", 128, 16)
    with pytest.raises(AdapterError, match=r"adapter .*router: module model.language_model.layers.0.mlp.gate is a "
                                           r"Mistral4TopkRouter, not a linear layer"):
        check_against(read_adapters(router), loading.empty_model(tiny_mistral4_dir))
