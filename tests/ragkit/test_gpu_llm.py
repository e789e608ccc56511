"""LocalLLM and the planner on CUDA, with a model of SmolLM2-135M's exact shape (random weights).

The embedded SmolLM2 GGUF (94 MB) cannot travel to a lent GPU machine, so these tests build a model of the
same architecture and size from its config; correctness on CUDA is checked against the CPU run of the same
weights (identical greedy tokens in fp32), memory against the planner.
"""

from __future__ import annotations

import gc

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def smol_shaped_dir(tmp_path_factory, tiny_mistral_dir, smollm2_shape):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("smol_shaped") / "model"
    LlamaForCausalLM(LlamaConfig(**smollm2_shape)).save_pretrained(path)
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

    gc.collect()  # models of earlier tests must be freed now, not during this load (negative deltas)
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

    gc.collect()  # models of earlier tests must be freed now, not during this load (negative deltas)
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


# ---------------------------------------------------------------- ragkit's NF4 MoE loader over several devices

# A Mistral-4 MoE big enough (~100 M params) that the CUDA allocator's 512-byte rounding stays well under 1%.
MID_MISTRAL4 = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=64,
                    num_experts_per_tok=4, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=32,
                    qk_nope_head_dim=32, v_head_dim=64, max_position_embeddings=4096)
REAL_WIDTH_LAYERS = 4  # of Mistral-Small-4's 36, at its real width: 8.06 GB in NF4
HEADROOM = 0.12


@pytest.fixture(scope="module")
def mid_mistral4_dir(tmp_path_factory):
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Mistral4Config, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=64, patch_size=8, head_dim=32)
    config = Mistral3Config(text_config=Mistral4Config(**MID_MISTRAL4), vision_config=vision, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mid_mistral4") / "model"
    Mistral3ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def real_width_mistral4_fp8(tmp_path_factory, repo_root):
    """Mistral-Small-4 at its real width (hidden 4096, 128 experts of 2048, Pixtral), 4 of its 36 layers, random
    weights as an FP8 checkpoint (128x128 blocks, 16 GB), written by benchmarks/moe_nf4_gpu.py."""
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (the nvidia-h200-x2 machine)")
    path = tmp_path_factory.mktemp("mistral4_real_width") / "fp8"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, str(repo_root / "benchmarks" / "moe_nf4_gpu.py"), "write", str(path),
                    str(REAL_WIDTH_LAYERS)], check=True, env=env)
    return path


def _logits(llm):
    import torch

    ids = torch.tensor([llm.encode_prompt(llm.chat_prompt("The capital of France is"))], device=llm.device)
    with torch.no_grad():
        return llm.model(input_ids=ids).logits.float().cpu()


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _free_cuda() -> None:
    """Give back the memory of models the caller has deleted, so that the next load is measured alone."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def test_nf4_moe_split_over_gpu_and_cpu_generates_like_the_gpu_load_and_holds_the_planned_bytes(
        mid_mistral4_dir, tiny_mistral_dir):
    """A small max_memory on cuda:0 sends the later decoder layers to the CPU, where they run (float32 compute, so
    that CPU and CUDA kernels agree to rounding)."""
    import torch

    from ragkit import LocalLLM
    from ragkit.quant import nf4_placement

    kw = dict(tokenizer=str(tiny_mistral_dir), quantization="nf4", compute_dtype="float32")
    one = LocalLLM(str(mid_mistral4_dir), device_map="cuda:0", **kw)
    want, want_logits = _greedy(one), _logits(one)
    del one
    _free_cuda()

    total = nf4_placement(mid_mistral4_dir, "cuda:0", compute_dtype=torch.float32).bytes_per_device[0]
    max_memory = {0: total // 2, "cpu": "8GiB"}
    before = torch.cuda.memory_allocated(0)
    llm = LocalLLM(str(mid_mistral4_dir), device_map="auto", max_memory=max_memory, **kw)
    allocated = torch.cuda.memory_allocated(0) - before
    placement = llm.model.nf4_placement
    print(f"GPU+CPU: planned {placement.bytes_per_device}, cuda:0 allocated {allocated} B "
          f"({allocated / placement.bytes_per_device[0]:.4f} of plan), map {llm.model.hf_device_map}")
    assert placement == nf4_placement(mid_mistral4_dir, "auto", max_memory, torch.float32)
    layer_devices = {d for k, d in placement.device_map.items() if ".language_model.layers." in k}
    assert layer_devices == {0, "cpu"}
    assert allocated == pytest.approx(placement.bytes_per_device[0], rel=0.05)
    got_logits = _logits(llm)
    print(f"GPU+CPU logits vs all-GPU: relative difference {_rel(got_logits, want_logits):.2e}")
    assert _rel(got_logits, want_logits) < 1e-3
    assert _greedy(llm) == want
    del llm
    _free_cuda()


def test_two_gpus_hold_a_real_width_mistral4_as_planned_and_generate_like_one(real_width_mistral4_fp8,
                                                                               tiny_mistral_dir):
    """Issue 8: the planner's split of a model that no single GPU's budget holds, loaded with
    device_map='auto' and the plan's max_memory: same placement, per-GPU memory within 5% of the plan, and the
    greedy tokens of the one-GPU load."""
    import torch

    from ragkit import LocalLLM, plan

    ckpt = real_width_mistral4_fp8
    weights = plan(ckpt, quant="nf4", context=4096).weights_bytes
    p = plan(ckpt, quant="nf4", context=4096, headroom=HEADROOM,
             gpus=[int(0.62 * weights / (1 - HEADROOM))] * 2)
    print(p.table())
    assert max(p.max_memory.values()) < weights  # neither GPU's budget holds the model: the split is forced

    one = LocalLLM(str(ckpt), tokenizer=str(tiny_mistral_dir), quantization="nf4", device_map="cuda:0")
    want, want_logits = _greedy(one), _logits(one)
    del one
    _free_cuda()

    before = [torch.cuda.memory_allocated(i) for i in (0, 1)]
    for i in (0, 1):
        torch.cuda.reset_peak_memory_stats(i)
    llm = LocalLLM(str(ckpt), tokenizer=str(tiny_mistral_dir), quantization="nf4", device_map="auto",
                   max_memory=p.max_memory)
    allocated = [torch.cuda.memory_allocated(i) - before[i] for i in (0, 1)]
    for g in p.gpus:
        print(f"GPU {g.index}: decoder layers {g.layers}, planned {g.weights / 1e9:.3f} GB, allocated "
              f"{allocated[g.index] / 1e9:.3f} GB ({allocated[g.index] / g.weights:.4f} of plan), peak while loading "
              f"{(torch.cuda.max_memory_allocated(g.index) - before[g.index]) / 1e9:.3f} GB, "
              f"max_memory {g.max_memory / 1e9:.3f} GB")
    assert llm.model.hf_device_map == p.device_map
    assert llm.model.nf4_placement.bytes_per_device == {g.index: g.weights for g in p.gpus}
    for g in p.gpus:
        assert allocated[g.index] == pytest.approx(g.weights, rel=0.05)
    got_logits = _logits(llm)
    got = _greedy(llm)
    print(f"one GPU: {want}\ntwo GPUs: {got}\nlogits relative difference {_rel(got_logits, want_logits):.2e}")
    assert _rel(got_logits, want_logits) < 1e-2
    assert got == want
    del llm
    _free_cuda()
