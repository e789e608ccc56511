"""Mistral-Small-4 in 4 bits on a GPU: one MoE layer at real width, and a scaled-down model from FP8.

    python benchmarks/moe_nf4_gpu.py layer OUT_DIR            # BF16 vs ragkit NF4, one Mistral-4 MoE layer
    python benchmarks/moe_nf4_gpu.py write CKPT_DIR [LAYERS]  # FP8 (128x128 blocks) checkpoint, real width
    python benchmarks/moe_nf4_gpu.py load CKPT_DIR OUT_DIR    # stream it to NF4: host RAM, GPU memory, planner

``layer``: hidden 4096, 128 routed experts (top-4) of moe_intermediate_size 2048, one shared expert,
random weights (std 0.02). Memory is what the layer's tensors hold; times are medians of CUDA-event
timed forwards (prefill: 2048 tokens, decode: 1 token). The bandwidth floor is the bytes of weights a
forward must read (decode: router + shared + 4 experts; prefill: every expert) over the measured
device-to-device copy bandwidth. ``load`` runs in its own process so that its peak RSS is the loader's.
Each step writes ``OUT_DIR/<step>.json`` with the machine, versions and every number.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import bitsandbytes as bnb
import psutil
import torch
import transformers
from safetensors.torch import save_file
from transformers import Mistral3Config, Mistral4Config, PixtralVisionConfig
from transformers.integrations.bitsandbytes import replace_with_bnb_linear
from transformers.models.mistral4.modeling_mistral4 import Mistral4MoE

from ragkit.quant import NF4Experts, expert_layout_for, load_nf4, measure_footprint
from ragkit.quant.fp8 import fp8_config, fp8_tensors
from ragkit.quant.loader import build_empty_model
from ragkit.quant.nf4 import bnb_nf4_config, nf4_bytes, set_linear4bit_weight

GIB = 1024**3
DT = torch.bfloat16
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = DEVICE.type == "cpu"  # a CPU dry run of the script at toy width


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def provenance() -> dict:
    return {
        "gpu": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "none (CPU dry run)",
        "cpu_cores": psutil.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def text_config(layers: int, small: bool = SMALL, vocab_size: int | None = None) -> Mistral4Config:
    """Mistral-Small-4-119B-2603's text config (transformers' Mistral4Config defaults), with fewer layers;
    ``small``: the CPU dry run's toy width (vocabulary 1,024 unless ``vocab_size`` says otherwise)."""
    if small:
        return Mistral4Config(num_hidden_layers=layers, hidden_size=256, moe_intermediate_size=128,
                              vocab_size=vocab_size or 1024, n_routed_experts=16, q_lora_rank=64, kv_lora_rank=32,
                              num_attention_heads=4, num_key_value_heads=4, intermediate_size=512)
    return Mistral4Config(num_hidden_layers=layers, **({"vocab_size": vocab_size} if vocab_size else {}))


def median_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written)."""
    size = GIB // 16 if SMALL else 2 * GIB
    a = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), 3, 10)
    del a, b
    return 2 * size / (ms / 1e3)


def nf4_layer(moe: Mistral4MoE, config: Mistral4Config) -> Mistral4MoE:
    """A ragkit-NF4 copy of a BF16 MoE layer: NF4Experts for the routed experts, Linear4bit elsewhere."""
    with torch.device("meta"):
        q = Mistral4MoE(config)
    q.gate.weight = torch.nn.Parameter(moe.gate.weight.detach().clone(), requires_grad=False)
    experts = NF4Experts.from_module(q.experts, expert_layout_for(q.experts), DT)
    experts.materialize(DEVICE)
    for name in ("gate_up_proj", "down_proj"):
        for e in range(experts.num_experts):
            experts.set_expert(name, e, getattr(moe.experts, name)[e])
    q.experts = experts
    replace_with_bnb_linear(q, modules_to_not_convert=[], quantization_config=bnb_nf4_config(DT))
    for name in ("gate_proj", "up_proj", "down_proj"):
        src = getattr(moe.shared_experts, name)
        set_linear4bit_weight(getattr(q.shared_experts, name), src.weight.detach(), DEVICE)
    return q


def layer(out: Path) -> None:
    torch.manual_seed(0)
    config = text_config(1)
    bw = copy_bandwidth()
    with torch.device(DEVICE):
        moe = Mistral4MoE(config).to(DT)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
    nf4 = nf4_layer(moe, config)
    sync()
    bf16_bytes, nf4_total = measure_footprint(moe).nbytes, measure_footprint(nf4).nbytes

    prefill = torch.randn(1, 2048, config.hidden_size, device=DEVICE, dtype=DT)
    decode = torch.randn(1, 1, config.hidden_size, device=DEVICE, dtype=DT)
    results: dict = {"provenance": provenance(), "copy_bandwidth_GBps": bw / 1e9,
                     "bf16_layer_bytes": bf16_bytes, "nf4_layer_bytes": nf4_total}
    with torch.no_grad():
        ref = moe(prefill)
        got = nf4(prefill)
        results["prefill_rel_err_vs_bf16"] = ((got - ref).float().norm() / ref.float().norm()).item()
        timings = {}
        for impl in ("grouped_mm", "eager"):
            config._experts_implementation = impl
            timings[f"bf16_{impl}_prefill_ms"] = median_ms(lambda: moe(prefill), 3, 10)
            timings[f"bf16_{impl}_decode_ms"] = median_ms(lambda: moe(decode), 5, 50)
        timings["nf4_prefill_ms"] = median_ms(lambda: nf4(prefill), 3, 10)
        timings["nf4_decode_ms"] = median_ms(lambda: nf4(decode), 5, 50)
        if DEVICE.type == "cuda":  # what a prefill allocates on top of the weights (activations, one expert)
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            nf4(prefill)
            results["nf4_prefill_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - start
    results.update(timings)
    hidden, inter, n = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
    expert_bf16 = 2 * 3 * hidden * inter
    expert_nf4 = nf4_bytes(2 * inter * hidden) + nf4_bytes(hidden * inter)
    fixed_bf16 = 2 * (moe.gate.weight.numel() + 3 * hidden * inter)
    fixed_nf4 = 2 * moe.gate.weight.numel() + measure_footprint(nf4.shared_experts).nbytes
    k = config.num_experts_per_tok
    results["floor_ms"] = {
        "bf16_decode": (fixed_bf16 + k * expert_bf16) / bw * 1e3,
        "nf4_decode": (fixed_nf4 + k * expert_nf4) / bw * 1e3,
        "bf16_prefill": (fixed_bf16 + n * expert_bf16) / bw * 1e3,
        "nf4_prefill": (fixed_nf4 + n * expert_nf4) / bw * 1e3,
    }
    results["ratios"] = {
        "memory_nf4_over_bf16": nf4_total / bf16_bytes,
        "prefill_nf4_over_bf16_grouped_mm": timings["nf4_prefill_ms"] / timings["bf16_grouped_mm_prefill_ms"],
        "decode_nf4_over_bf16_grouped_mm": timings["nf4_decode_ms"] / timings["bf16_grouped_mm_decode_ms"],
        "prefill_nf4_over_bf16_eager": timings["nf4_prefill_ms"] / timings["bf16_eager_prefill_ms"],
        "decode_nf4_over_bf16_eager": timings["nf4_decode_ms"] / timings["bf16_eager_decode_ms"],
    }
    write(out / "layer.json", results)


def hf_name(name: str) -> str:
    """The key the HF release of Mistral-Small-4 uses for a Mistral3ForConditionalGeneration parameter."""
    for model_prefix, file_prefix in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                                      ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(model_prefix):
            return file_prefix + name[len(model_prefix):]
    return name


def full_config(layers: int, small: bool = SMALL, vocab_size: int | None = None) -> Mistral3Config:
    vision = PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1) if small else PixtralVisionConfig()
    return Mistral3Config(text_config=text_config(layers, small, vocab_size).to_dict(), vision_config=vision.to_dict())


def write_checkpoint(ckpt: Path, layers: int, small: bool = SMALL, vocab_size: int | None = None) -> None:
    """Random FP8 checkpoint (128x128 blocks, static activation scales) in the HF layout, one shard per layer
    (``small``, ``vocab_size``: as :func:`text_config`)."""
    torch.manual_seed(0)
    ckpt.mkdir(parents=True, exist_ok=True)
    config = full_config(layers, small, vocab_size)
    model = build_empty_model(config, DT)
    shards: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, t in model.state_dict().items():
        layer = name.split("layers.")[1].split(".")[0] if "language_model.layers." in name else "rest"
        shards.setdefault(layer, []).append((name, t.shape))
    weight_map = {}
    for i, (layer, names) in enumerate(shards.items()):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        out = {}
        for name, shape in names:
            t = torch.ones(shape, device=DEVICE, dtype=DT) if name.endswith("norm.weight") else \
                torch.randn(shape, device=DEVICE, dtype=DT) * 0.02
            out.update({k: v.cpu() for k, v in fp8_tensors(hf_name(name), t, (128, 128), "static").items()})
        save_file(out, str(ckpt / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, fname))
        print(f"wrote {fname}: {len(out)} tensors", flush=True)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    data = config.to_dict()
    data["quantization_config"] = fp8_config((128, 128), "static")
    data["architectures"] = ["Mistral3ForConditionalGeneration"]
    (ckpt / "config.json").write_text(json.dumps(data, indent=1))


class RssPeak(threading.Thread):
    """Samples the process's resident set every 10 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = 0, True

    def run(self) -> None:
        proc = psutil.Process()
        while self.running:
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.01)


def load(ckpt: Path, out: Path) -> None:
    from ragkit.planner import plan

    torch.zeros(1, device=DEVICE)
    shard_sizes = [p.stat().st_size for p in ckpt.glob("*.safetensors")]
    rss0 = psutil.Process().memory_info().rss
    sampler = RssPeak()
    sampler.start()
    t0 = time.perf_counter()
    model = load_nf4(ckpt, device=DEVICE, progress=False)
    sync()
    seconds = time.perf_counter() - t0
    sampler.running = False
    sampler.join()
    fp = measure_footprint(model)
    config = full_config(int(json.loads((ckpt / "config.json").read_text())["text_config"]["num_hidden_layers"]))
    planned = plan(config, quant="nf4", moe_experts="ragkit", context=4096)
    ids = torch.randint(100, 1000, (1, 64), device=DEVICE)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)
        t1 = time.perf_counter()
        new = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
        sync()
    results = {
        "provenance": provenance(),
        "checkpoint": {"layers": config.text_config.num_hidden_layers, "shards": len(shard_sizes),
                       "largest_shard_bytes": max(shard_sizes), "total_bytes": sum(shard_sizes),
                       "layout": "FP8 e4m3, 128x128 block weight_scale_inv, static activation_scale"},
        "params": fp.params,
        "bf16_model_bytes": 2 * fp.params,
        "load_seconds": seconds,
        "host_rss_before_bytes": rss0,
        "host_rss_peak_bytes": max(sampler.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "host_rss_peak_over_start_bytes": max(sampler.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - rss0,
        "gpu_allocated_after_load_bytes": torch.cuda.memory_allocated() if DEVICE.type == "cuda" else None,
        "gpu_peak_during_load_bytes": torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else None,
        "measured_weight_bytes": fp.nbytes,
        "bytes_per_param": fp.bytes_per_param,
        "planned_weight_bytes": planned.weights_bytes,
        "planned_over_measured": planned.weights_bytes / fp.nbytes,
        "generate_16_tokens_s": time.perf_counter() - t1,
        "generated_tokens": new.shape[1] - ids.shape[1],
    }
    full = plan(Mistral3Config(text_config=Mistral4Config().to_dict(), vision_config=PixtralVisionConfig().to_dict()),
                quant="nf4", moe_experts="ragkit", context=4096)
    results["planned_full_model_nf4_weight_bytes"] = full.weights_bytes
    write(out / "load.json", results)


def write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1), flush=True)


if __name__ == "__main__":
    step = sys.argv[1]
    if step == "layer":
        layer(Path(sys.argv[2]))
    elif step == "write":
        write_checkpoint(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 4)
    elif step == "load":
        load(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
