"""NF4Experts across MoE families, its two forward paths, and the FP8 (de)quantization it loads from (CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import GptOssConfig, Mistral4Config, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.mistral4.modeling_mistral4 import Mistral4Experts
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

from ragkit.errors import QuantizationError
from ragkit.quant import ExpertLayout, NF4Experts, expert_layout_for, load_nf4, register_expert_layout
from ragkit.quant.nf4 import set_cpu_packing
from ragkit.quant.fp8 import dequantize_fp8, quantize_fp8
from test_quant_loader import cpu_peak_bytes, rel

FAMILIES = {
    "mistral4": (Mistral4Experts, Mistral4Config(hidden_size=128, moe_intermediate_size=128, n_routed_experts=16)),
    "mixtral": (MixtralExperts, MixtralConfig(hidden_size=128, intermediate_size=128, num_local_experts=16)),
    "qwen2_moe": (Qwen2MoeExperts, Qwen2MoeConfig(hidden_size=128, moe_intermediate_size=128, num_experts=16)),
    "gpt_oss": (GptOssExperts, GptOssConfig(hidden_size=128, intermediate_size=128, num_local_experts=16)),
}


def quantized_twin(source: nn.Module) -> NF4Experts:
    layout = expert_layout_for(source)
    twin = NF4Experts.from_module(source, layout, torch.bfloat16)
    twin.materialize("cpu")
    for name in (layout.first, layout.second):
        for e in range(twin.num_experts):
            twin.set_expert(name, e, getattr(source, name)[e])
        if layout.bias:
            twin.set_bias(name, getattr(source, f"{name}_bias"))
    return twin


def routing(tokens: int, experts: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 128, generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(experts, generator=g)[:4] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 4, generator=g), -1).to(torch.bfloat16)
    return x, idx, weights


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_experts_compute_what_the_family_computes_with_nf4_weights(family):
    """Concatenated (Mistral-4, Mixtral, Qwen) and transposed+bias+interleaved (gpt-oss) layouts."""
    cls, config = FAMILIES[family]
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    source = cls(config).to(torch.bfloat16)
    for p in source.parameters():
        nn.init.normal_(p, 0.0, 0.05)
    twin = quantized_twin(source)
    x, idx, weights = routing(64, 16)
    with torch.no_grad():
        grouped = twin(x, idx, weights)  # 256 assignments >= 16 experts: grouped path
        single = torch.cat([twin(x[i : i + 1], idx[i : i + 1], weights[i : i + 1]) for i in range(8)])
        layout = expert_layout_for(source)
        for name in (layout.first, layout.second):  # the family's own forward over NF4 round-tripped weights
            for e in range(16):
                w = twin.dequantize_expert(name, e)
                getattr(source, name)[e].copy_(w.t() if layout.transposed else w)
        reference = source(x, idx, weights)
    assert rel(grouped, reference) < 0.01
    assert rel(single, reference[:8]) < 0.01


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_by_expert_id_on_the_device_computes_what_the_per_expert_path_does(family):
    """The host-free decode path (on CUDA with the Triton kernel; here through bitsandbytes' dequantization on
    the CPU): 3 tokens x top-4, one of them an expert-parallel sentinel (id 16 = E: not this shard's, adds 0)."""
    cls, config = FAMILIES[family]
    torch.manual_seed(0)
    source = cls(config).to(torch.bfloat16)
    for p in source.parameters():
        nn.init.normal_(p, 0.0, 0.05)
    twin = quantized_twin(source)
    x, idx, weights = routing(3, 16, seed=1)
    idx[1, 2] = 16
    with torch.no_grad():
        assert twin._triton_kernel() is None  # the CPU's forward takes the per-expert path
        want = twin(x, idx, weights)
        got = twin._forward_gathered(x, idx, weights)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel(got, want) < 0.01


def test_group_dequantization_equals_per_expert_dequantization():
    cls, config = FAMILIES["mistral4"]
    source = cls(config).to(torch.bfloat16)
    nn.init.normal_(source.gate_up_proj, 0, 0.05)
    nn.init.normal_(source.down_proj, 0, 0.05)
    twin = quantized_twin(source)
    ids = torch.tensor([0, 5, 15])
    stacked = torch.stack([twin.dequantize_expert("gate_up_proj", int(i)) for i in ids])
    assert torch.equal(twin.dequantize_experts("gate_up_proj", ids), stacked)


def test_prefill_dequantizes_only_routed_experts_a_group_at_a_time():
    cls, config = FAMILIES["mistral4"]
    source = cls(config).to(torch.bfloat16)
    nn.init.normal_(source.gate_up_proj, 0, 0.05)
    nn.init.normal_(source.down_proj, 0, 0.05)
    twin = quantized_twin(source)
    x, idx, weights = routing(64, 6)  # 256 assignments, all to experts 0..5 of 16
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        twin(x, idx, weights)
    dequantized = sum(e.count for e in prof.key_averages() if e.key == "bitsandbytes::dequantize_4bit")
    assert twin.group_size == 2
    assert dequantized == 2 * 3  # gate_up + down for 3 groups of 2 routed experts; the other 10 never


def test_mid_size_layer_prefill_never_holds_all_experts_dequantized():
    """16 experts of 512x512: a 256-token prefill must stay far below the 25 MB of all experts in BF16."""
    config = Mistral4Config(hidden_size=512, moe_intermediate_size=512, n_routed_experts=16)
    with torch.device("meta"):
        source = Mistral4Experts(config)
    twin = NF4Experts.from_module(source, expert_layout_for(source), torch.bfloat16)
    twin.materialize("cpu")
    g = torch.Generator().manual_seed(0)
    for e in range(16):
        twin.set_expert("gate_up_proj", e, torch.randn(1024, 512, generator=g) * 0.05)
        twin.set_expert("down_proj", e, torch.randn(512, 512, generator=g) * 0.05)
    x = torch.randn(256, 512, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, 16, (256, 4), generator=g)
    weights = torch.full((256, 4), 0.25, dtype=torch.bfloat16)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = twin(x, idx, weights)
    all_experts_bf16 = 2 * 16 * 3 * 512 * 512
    assert torch.isfinite(out).all()
    assert cpu_peak_bytes(prof) < all_experts_bf16 / 4, cpu_peak_bytes(prof)


def test_layout_registry_takes_a_family_that_does_not_describe_itself():
    class PlainExperts(nn.Module):  # no @use_experts_implementation flags
        def __init__(self):
            super().__init__()
            self.w_in = nn.Parameter(torch.randn(4, 64, 32))
            self.w_out = nn.Parameter(torch.randn(4, 32, 64))
            self.act_fn = nn.SiLU()

    module = PlainExperts()
    assert expert_layout_for(module) is None
    register_expert_layout(PlainExperts, ExpertLayout(first="w_in", second="w_out", has_gate=False))
    twin = NF4Experts.from_module(module, expert_layout_for(module), torch.bfloat16)
    assert twin.shapes == {"w_in": (64, 32), "w_out": (32, 64)}


def test_post_expert_norm_family_is_refused_by_name():
    module = Mistral4Experts(FAMILIES["mistral4"][1])
    module.has_post_expert_norm = True
    with pytest.raises(QuantizationError, match="Mistral4Experts"):
        expert_layout_for(module)


def test_mixtral_per_expert_checkpoint_streams_into_nf4_experts(tmp_path, nf4_cpu_kernel):
    """save_pretrained writes Mixtral's experts one by one (w1/w3/w2): the loader fuses gate+up per expert."""
    config = MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path)
    model = MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    nf4 = load_nf4(tmp_path, device="cpu", progress=False)
    set_cpu_packing(nf4, nf4_cpu_kernel == "packed")
    assert isinstance(nf4.model.layers[0].mlp.experts, NF4Experts)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(nf4(input_ids=ids).logits, model(input_ids=ids).logits) < 0.25


@pytest.mark.parametrize("block", [(128, 128), (32, 64), None], ids=["block128", "block32x64", "per-tensor"])
def test_fp8_round_trip_including_partial_blocks(block):
    w = torch.randn(320, 200) * 0.02  # 320 = 2.5 blocks of 128 rows: the last block row is partial
    q, scale = quantize_fp8(w, block)
    assert q.dtype == torch.float8_e4m3fn
    expected = () if block is None else (-(-320 // block[0]), -(-200 // block[1]))
    assert tuple(scale.shape) == expected
    assert rel(dequantize_fp8(q, scale, block, "w"), w) < 0.05


def test_fp8_ue8m0_exponent_scales():
    w = torch.randn(256, 256) * 0.02
    q, scale = quantize_fp8(w, (128, 128))
    exponent = torch.ceil(torch.log2(scale))  # a power of two >= the scale keeps values in range
    q = (w.reshape(2, 128, 2, 128) / torch.exp2(exponent)[:, None, :, None]).reshape(256, 256).to(torch.float8_e4m3fn)
    as_bytes = (exponent + 127).to(torch.uint8)
    assert rel(dequantize_fp8(q, as_bytes, (128, 128), "w"), w) < 0.05


def test_nf4_dispatch_covers_fused_experts_and_fp8_but_not_dense_bf16_models():
    from transformers import LlamaConfig

    from ragkit.quant import needs_ragkit_nf4

    dense = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=2, architectures=["LlamaForCausalLM"])
    assert not needs_ragkit_nf4(dense)  # stock bitsandbytes already gives it 4 bits
    dense.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    assert needs_ragkit_nf4(dense)  # transformers refuses bitsandbytes on FP8 checkpoints
    assert needs_ragkit_nf4(MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, num_local_experts=4))
