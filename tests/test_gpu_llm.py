"""LocalLLM and the planner on CUDA, with a model of SmolLM2-135M's exact shape (random weights).

The embedded SmolLM2 GGUF (94 MB) cannot travel to a lent GPU machine, so these tests build a model of the
same architecture and size from its config; correctness on CUDA is checked against the CPU run of the same
weights (identical greedy tokens in fp32), memory against the planner.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

# SmolLM2-135M-Instruct's published shape (LlamaForCausalLM).
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def smol_shaped_dir(tmp_path_factory, tiny_mistral_dir):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("smol_shaped") / "model"
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_mistral_dir).save_pretrained(path)
    return path


def _greedy(llm, n=12):
    ids = llm.encode_prompt(llm.chat_prompt("The capital of France is"))
    return llm.generate_ids(ids, max_new_tokens=n)


def test_cuda_greedy_tokens_equal_cpu_in_fp32(smol_shaped_dir):
    from ragkit import LocalLLM

    cpu = _greedy(LocalLLM(str(smol_shaped_dir), device_map="cpu", dtype="float32"))
    llm = LocalLLM(str(smol_shaped_dir), device_map="cuda", dtype="float32")
    assert llm.device.type == "cuda"
    assert _greedy(llm) == cpu


@pytest.mark.parametrize("quant, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_cuda_bitsandbytes_loads_generates_and_matches_the_plan(smol_shaped_dir, quant, layer):
    import torch

    from ragkit import LocalLLM, plan

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    llm = LocalLLM(str(smol_shaped_dir), quantization=quant, compute_dtype="bfloat16", device_map="cuda")
    allocated = torch.cuda.memory_allocated() - before
    assert type(llm.model.model.layers[0].mlp.up_proj).__name__ == layer
    assert len(_greedy(llm)) >= 1
    planned = plan(str(smol_shaped_dir), quant=quant).weights_bytes
    print(f"{quant}: planned {planned} B, CUDA allocated {allocated} B, ratio {allocated / planned:.4f}")
    assert allocated == pytest.approx(planned, rel=0.03)
    del llm
    torch.cuda.empty_cache()


def test_cuda_16bit_allocation_matches_the_plan(smol_shaped_dir):
    import torch

    from ragkit import LocalLLM, plan

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    llm = LocalLLM(str(smol_shaped_dir), device_map="cuda", dtype="bfloat16")
    allocated = torch.cuda.memory_allocated() - before
    planned = plan(str(smol_shaped_dir), quant="none", dtype="bfloat16").weights_bytes
    print(f"bf16: planned {planned} B, CUDA allocated {allocated} B, ratio {allocated / planned:.4f}")
    assert allocated == pytest.approx(planned, rel=0.03)
    del llm
    torch.cuda.empty_cache()


def test_auto_device_map_splits_over_gpu_and_cpu_under_a_small_budget(smol_shaped_dir):
    from ragkit import LocalLLM

    cpu = _greedy(LocalLLM(str(smol_shaped_dir), device_map="cpu", dtype="float32"))
    llm = LocalLLM(str(smol_shaped_dir), device_map="auto", dtype="float32",
                   max_memory={0: "200MiB", "cpu": "8GiB"})
    assert {0, "cpu"} <= set(llm.model.hf_device_map.values())
    assert _greedy(llm) == cpu
