"""Mistral-Small-4-shaped models streamed from BF16 and FP8 checkpoints into ragkit's NF4 (CPU)."""

from __future__ import annotations

import hashlib
import json
import shutil

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.profiler import ProfilerActivity, profile
from transformers import BitsAndBytesConfig, Mistral3ForConditionalGeneration

from ragkit.errors import QuantizationError
from ragkit.placement import LINEAR4BIT_CODE_BYTES
from ragkit.quant import NF4Experts, load_nf4, measure_footprint, write_fp8_checkpoint
from ragkit.quant.fp8 import dequantize_fp8, expert_scale
from ragkit.quant.nf4 import (
    cpu_packable,
    is_cpu_packed,
    nf4_bytes,
    nf4_cpu_packed_bytes,
    quantize_nf4,
    set_cpu_packing,
)

IDS = torch.randint(20, 250, (2, 16), generator=torch.Generator().manual_seed(1))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cpu_peak_bytes(prof) -> int:
    """Peak of live CPU tensor bytes over a profiled region (allocations per op, frees as [memory] events)."""
    events = []
    for e in prof.events():
        size = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if size:
            events.append((e.time_range.start, size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


@pytest.fixture(scope="module")
def reference(tiny_mistral4_dir):
    return Mistral3ForConditionalGeneration.from_pretrained(tiny_mistral4_dir, dtype=torch.bfloat16).eval()


@pytest.fixture(scope="module")
def nf4_model(tiny_mistral4_dir, nf4_cpu_kernel):
    model = load_nf4(tiny_mistral4_dir, device="cpu", progress=False)
    set_cpu_packing(model, nf4_cpu_kernel == "packed")
    return model


@pytest.fixture(
    scope="module",
    params=[(32, 32), pytest.param(None, marks=pytest.mark.slow)],
    ids=["fp8-block32", "fp8-per-tensor"],
)
def fp8_dir(request, tiny_mistral4_dir, tmp_path_factory):
    scheme = "dynamic" if request.param else "static"
    return write_fp8_checkpoint(tiny_mistral4_dir, tmp_path_factory.mktemp("fp8") / "ckpt", request.param, scheme)


def test_every_routed_expert_and_linear_is_nf4_and_bytes_per_param_at_most_0_6(nf4_model, reference):
    experts = [m for m in nf4_model.modules() if isinstance(m, NF4Experts)]
    assert len(experts) == 2 and all(m.num_experts == 16 for m in experts)
    plain_linears = [n for n, m in nf4_model.named_modules() if type(m) is torch.nn.Linear]
    assert plain_linears == ["lm_head"]  # what bitsandbytes itself keeps 16-bit
    fp = measure_footprint(nf4_model)
    assert fp.params == sum(p.numel() for p in reference.parameters())
    assert fp.bytes_per_param <= 0.6, fp


def test_stock_bitsandbytes_leaves_experts_16_bit_on_the_same_model(tiny_mistral4_dir, nf4_model):
    stock = Mistral3ForConditionalGeneration.from_pretrained(
        tiny_mistral4_dir, dtype=torch.bfloat16, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
    )
    assert measure_footprint(stock).bytes_per_param > 1.5  # the "10% instead of 75%"
    assert measure_footprint(nf4_model).nbytes < measure_footprint(stock).nbytes / 3


def test_logits_error_vs_bf16_is_that_of_nf4_weights(nf4_model, reference, tiny_mistral4_dir):
    """ragkit == the BF16 model with every quantized weight replaced by bitsandbytes' NF4 round trip."""
    simulated = Mistral3ForConditionalGeneration.from_pretrained(tiny_mistral4_dir, dtype=torch.bfloat16).eval()
    dense_err, expert_err = [], []
    with torch.no_grad():
        for name, module in simulated.named_modules():
            if type(module) is torch.nn.Linear and name != "lm_head":
                codes, state = quantize_nf4(module.weight)
                deq = bnbf.dequantize_4bit(codes, state)
                dense_err.append(rel(deq, module.weight))
                module.weight.copy_(deq)
            for proj in ("gate_up_proj", "down_proj"):
                w = getattr(module, proj, None)
                if isinstance(w, torch.Tensor) and w.dim() == 3:
                    for e in range(w.shape[0]):
                        codes, state = quantize_nf4(w[e])
                        deq = bnbf.dequantize_4bit(codes, state)
                        expert_err.append(rel(deq, w[e]))
                        w[e].copy_(deq)
        ref, sim, got = (m(input_ids=IDS).logits for m in (reference, simulated, nf4_model))
    # per weight, experts are exactly as accurate as bitsandbytes' NF4 on the dense layers
    assert sum(expert_err) / len(expert_err) <= 1.05 * sum(dense_err) / len(dense_err)
    assert rel(got, sim) < 0.03  # only bf16 summation order differs
    assert rel(got, ref) < 0.25


def test_greedy_generation_is_deterministic(nf4_model):
    with torch.no_grad():
        first = nf4_model.generate(IDS[:1], max_new_tokens=6, do_sample=False)
        second = nf4_model.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    assert first.shape == (1, IDS.shape[1] + 6)
    assert torch.equal(first, second)


def test_forward_runs_only_the_routed_experts(nf4_model):
    """Count bitsandbytes' 4-bit matmul ops in one MoE forward: two per expert that tokens were routed to."""
    experts = nf4_model.model.language_model.layers[1].mlp.experts
    seen = {}
    handle = experts.register_forward_pre_hook(lambda _m, args: seen.setdefault("args", args))
    with torch.no_grad():
        nf4_model(input_ids=IDS[:1, :3])
    handle.remove()
    hidden, top_k_index, top_k_weights = seen["args"]
    routed = top_k_index.unique().numel()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        experts(hidden, top_k_index, top_k_weights)
    calls = sum(e.count for e in prof.key_averages() if e.key == "bitsandbytes::gemm_4bit")
    assert routed < experts.num_experts
    assert calls == 2 * routed


def test_fp8_checkpoint_streams_to_nf4_of_its_dequantized_weights(fp8_dir, nf4_model, reference, nf4_cpu_kernel):
    model = load_nf4(fp8_dir, device="cpu", progress=False)
    set_cpu_packing(model, nf4_cpu_kernel == "packed")
    block = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]["weight_block_size"]
    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())["weight_map"]
    key = "language_model.model.layers.1.mlp.experts.down_proj"
    with safe_open(str(fp8_dir / index[key]), "pt") as f:
        stored, scale = f.get_tensor(key), f.get_tensor(key + "_scale_inv")
    assert stored.dtype == torch.float8_e4m3fn
    experts = model.model.language_model.layers[1].mlp.experts
    for e in (0, 15):
        weight = dequantize_fp8(stored[e], expert_scale(scale, e, 16, key), tuple(block) if block else None, key)
        codes, state = quantize_nf4(weight.to(torch.bfloat16))
        assert torch.equal(experts.down_proj_codes[e], codes.view(-1))
        assert torch.equal(experts.down_proj_absmax[e], state.absmax)
    assert isinstance(model.model.language_model.layers[0].self_attn.q_b_proj, bnb.nn.Linear4bit)
    with torch.no_grad():
        ref = reference(input_ids=IDS).logits
        # FP8 then NF4 rounding: as far from BF16 as NF4 alone, give or take
        assert rel(model(input_ids=IDS).logits, ref) < 1.25 * rel(nf4_model(input_ids=IDS).logits, ref)
        assert model.generate(IDS[:1], max_new_tokens=4, do_sample=False).shape[1] == IDS.shape[1] + 4


def test_loading_holds_about_one_shard_not_the_bf16_model(tiny_mistral4_dir):
    shards = sorted(tiny_mistral4_dir.glob("*.safetensors"))
    assert len(shards) >= 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = load_nf4(tiny_mistral4_dir, device="cpu", progress=False)
    peak = cpu_peak_bytes(prof)
    final = measure_footprint(model).nbytes
    bf16 = 2 * measure_footprint(model).params
    largest_shard = max(s.stat().st_size for s in shards)
    # safetensors maps a whole shard while it is open; on top of that only one tensor is in flight
    assert peak - final <= 2 * largest_shard, (peak, final, largest_shard)
    assert peak < bf16 / 1.5, (peak, bf16)


def _tree_digest(path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.iterdir()))).hexdigest()


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit(path, key, value, anchor) -> None:
    """Set (or with ``value=None`` delete) tensor ``key`` in the shard that holds ``anchor``."""
    shard = path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][anchor]
    tensors = load_file(shard)
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    save_file(tensors, shard, metadata={"format": "pt"})


def test_unknown_quant_method_is_refused_by_name(tiny_mistral4_dir, tmp_path):
    ckpt = _copy(tiny_mistral4_dir, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    (ckpt / "config.json").write_text(json.dumps(config))
    before = _tree_digest(ckpt)
    with pytest.raises(QuantizationError, match="compressed-tensors"):
        load_nf4(ckpt, device="cpu", progress=False)
    assert _tree_digest(ckpt) == before


O_PROJ = "language_model.model.layers.0.self_attn.o_proj.weight"
DOWN = "language_model.model.layers.0.mlp.experts.down_proj"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (O_PROJ.replace(".weight", ".weight_scale_inv"), torch.ones(3, 5), r"Unsupported FP8 layout.*o_proj"),
        (O_PROJ.replace(".weight", ".weight_scale_inv"), None, r"no .*o_proj.weight_scale_inv"),
        (O_PROJ.replace(".weight", ".weight_scale"), torch.ones(1), r"compressed-tensors"),
        (DOWN + "_scale_inv", torch.ones(7), r"does not split into 16 experts"),
    ],
    ids=["scale-grid-does-not-tile", "fp8-without-scale", "compressed-tensors-key", "expert-scale-shape"],
)
def test_unknown_fp8_layout_is_refused_naming_the_tensor(fp8_dir, tmp_path, key, value, message):
    ckpt = _copy(fp8_dir, tmp_path)
    _edit(ckpt, key, value, anchor=DOWN if key.startswith(DOWN) else O_PROJ)
    before = _tree_digest(ckpt)
    with pytest.raises(QuantizationError, match=message):
        load_nf4(ckpt, device="cpu", progress=False)
    assert _tree_digest(ckpt) == before


@pytest.mark.slow  # imports LlamaIndex and loads the model once more (~40 s on 2 cores)
def test_localllm_nf4_on_a_fused_moe_model_goes_through_ragkit(tiny_mistral4_dir):
    """The documented way: LocalLLM(path, quantization="nf4") dispatches fused-expert models to load_nf4."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ragkit import LocalLLM

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="w1", eos_token="w2", pad_token="w11")
    llm = LocalLLM(str(tiny_mistral4_dir), quantization="nf4", device_map="cpu", tokenizer=tokenizer)
    assert isinstance(llm.model.model.language_model.layers[0].mlp.experts, NF4Experts)
    assert measure_footprint(llm.model).bytes_per_param <= 0.6
    assert len(llm.generate_ids([5, 6, 7, 8], max_new_tokens=3)) == 3


def test_planner_predicts_the_loaded_nf4_footprint(tiny_mistral4_dir, nf4_model):
    """ragkit.plan(moe_experts="ragkit") assumes exactly the storage NF4Experts and Linear4bit allocate.

    On the packed CPU kernel, layers that bitsandbytes repacked at their first forward hold what
    ``nf4_cpu_packed_bytes`` says instead (un-nested bf16 absmax): the difference is accounted exactly.
    """
    from ragkit import plan

    planned = plan(str(tiny_mistral4_dir), quant="nf4", moe_experts="ragkit", context=256).weights_bytes
    with torch.no_grad():
        nf4_model(input_ids=IDS)  # the steady state of inference: packed where the kernel packs
    repacked = [m.weight.quant_state.shape.numel() for m in nf4_model.modules() if is_cpu_packed(m)]
    extra = sum(nf4_cpu_packed_bytes(n) - (nf4_bytes(n) + LINEAR4BIT_CODE_BYTES) for n in repacked)
    measured = measure_footprint(nf4_model).nbytes
    assert planned + extra == measured, (planned, extra, measured)


def test_the_packed_cpu_kernel_takes_every_layer_whose_shape_it_can_hold(nf4_model, nf4_cpu_kernel):
    """Packed run: every Linear4bit of the text model whose shape fits is repacked at the first forward, the
    others stay plain (bitsandbytes would fail on them). Plain run: none is repacked. The tiny model has layers
    of both kinds. (The vision tower does not run on text and is never repacked.)"""
    with torch.no_grad():
        nf4_model(input_ids=IDS)
    layers = [m for m in nf4_model.model.language_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    fits = [cpu_packable(m.out_features, m.in_features) for m in layers]
    assert any(fits) and not all(fits)
    packed = [is_cpu_packed(m) for m in layers]
    assert packed == (fits if nf4_cpu_kernel == "packed" else [False] * len(layers))


@pytest.mark.parametrize("model", ["default", "mistral-small-4"])
def test_real_shaped_models_keep_every_layer_on_the_packed_cpu_kernel(model):
    """SmolLM2 and real-width Mistral-Small-4 (config only, meta weights): every layer bitsandbytes makes
    4-bit has a shape the packed AVX512-BF16 kernel holds, so only tiny test models leave the fast path."""
    from pathlib import Path

    from ragkit.placement import load_config
    from ragkit.quant.loader import build_empty_model

    source = Path(__file__).resolve().parents[2] / "fixtures" / "mistral_small_4_config.json" if model != "default" else model
    config, _ = load_config(source)
    empty = build_empty_model(config, torch.bfloat16)
    shapes = [(m.out_features, m.in_features) for m in empty.modules() if type(m) is torch.nn.Linear]
    assert len(shapes) > 10
    assert [s for s in shapes if not cpu_packable(*s)] == []


def test_importing_bitsandbytes_through_ragkit_prints_nothing():
    """On AVX512-BF16 CPUs bitsandbytes warns at import that it cannot fetch a hub kernel; ragkit (offline)
    filters that line, so a CLI error's first line stays "Error: ..." (and on other CPUs nothing is printed)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", "import ragkit, bitsandbytes.backends.cpu.ops"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stderr == "", run.stderr
