"""ragkit's NF4 on CUDA: the tiny Mistral-Small-4-shaped model from FP8, and one MoE layer at real width."""

from __future__ import annotations

import pytest
import torch
from transformers import Mistral3ForConditionalGeneration, Mistral4Config
from transformers.models.mistral4.modeling_mistral4 import Mistral4Experts

from ragkit.quant import NF4Experts, expert_layout_for, load_nf4, measure_footprint, write_fp8_checkpoint

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_checkpoint_loads_on_cuda_like_on_cpu(tiny_mistral4_dir, tmp_path):
    fp8 = write_fp8_checkpoint(tiny_mistral4_dir, tmp_path / "fp8", (32, 32))
    gpu = load_nf4(fp8, device="cuda", progress=False)
    cpu = load_nf4(fp8, device="cpu", progress=False)
    ref = Mistral3ForConditionalGeneration.from_pretrained(tiny_mistral4_dir, dtype=torch.bfloat16).cuda().eval()
    assert measure_footprint(gpu).bytes_per_param <= 0.6
    experts = gpu.model.language_model.layers[0].mlp.experts
    assert experts.gate_up_proj_codes.is_cuda
    assert torch.equal(experts.gate_up_proj_codes.cpu(), cpu.model.language_model.layers[0].mlp.experts.gate_up_proj_codes)
    ids = torch.randint(20, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = gpu(input_ids=ids.cuda()).logits, ref(input_ids=ids.cuda()).logits
        assert rel(got.cpu(), cpu(input_ids=ids).logits) < 0.05  # CUDA kernels vs CPU ops, same weights
        assert rel(got, want) < 0.25
        out = gpu.generate(ids[:1].cuda(), max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


def test_real_width_experts_never_dequantize_all_at_once():
    """128 experts of 4096x2048: a 2k-token prefill holds one group (1/8) of experts in BF16, not all 6.4 GB."""
    config = Mistral4Config(num_hidden_layers=1)
    with torch.device("meta"):
        source = Mistral4Experts(config)
    experts = NF4Experts.from_module(source, expert_layout_for(source), torch.bfloat16)
    experts.materialize("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for e in range(config.n_routed_experts):
        experts.set_expert("gate_up_proj", e, torch.randn(2 * 2048, 4096, device="cuda", generator=g) * 0.02)
        experts.set_expert("down_proj", e, torch.randn(4096, 2048, device="cuda", generator=g) * 0.02)
    hidden = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    top_k = torch.randint(0, 128, (2048, 4), device="cuda")
    weights = torch.full((2048, 4), 0.25, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = experts(hidden, top_k, weights)
    extra = torch.cuda.max_memory_allocated() - base
    all_experts_bf16 = 2 * 128 * 3 * 4096 * 2048
    assert out.shape == hidden.shape and torch.isfinite(out).all()
    assert experts.group_size == 16
    assert extra < all_experts_bf16 / 6, extra  # measured on an H200: 0.83 GB (16 experts + activations)
    e = int(top_k[0, 0])
    x = hidden[:1]
    h = experts.gate_fn(x @ experts.dequantize_expert("gate_up_proj", e).t())
    direct = h @ experts.dequantize_expert("down_proj", e).t()
    assert rel(experts._project("down_proj", e, experts.gate_fn(experts._project("gate_up_proj", e, x))), direct) < 0.02
