"""Mistral-Small-4-shaped model on CPU: bytes/param, error vs BF16, and host memory while streaming to NF4.

    python benchmarks/moe_nf4_cpu.py [OUT_JSON]    # default: benchmarks/results/moe_nf4_cpu.json

A random Mistral3 (Mistral-4 MoE text, 4 layers x 32 experts, + Pixtral vision) model is saved as BF16
in 1 MB shards, then as FP8 (128x128 blocks) and FP8 (per-tensor). Each is loaded by ragkit in NF4 in
a fresh subprocess that samples its RSS every 5 ms (peak over the RSS after imports and one warm-up
bitsandbytes quantize + matmul, whose one-time library state is not the loader's), and the stock
bitsandbytes NF4 load of the BF16 checkpoint is measured the same way. Errors are relative Frobenius
norms of the logits of 4 sequences x 32 tokens against the BF16 model.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "child" else Path(__file__).parent / "results" / "moe_nf4_cpu.json"


def build(path: Path) -> None:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Mistral4Config, PixtralVisionConfig

    text = Mistral4Config(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=32,
                          num_experts_per_tok=4, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=32,
                          qk_nope_head_dim=32, v_head_dim=64, max_position_embeddings=4096)
    vision = PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=64, patch_size=8, head_dim=32)
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision, image_token_index=10))
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="1MB")


def child(kind: str, path: str) -> None:
    """Load one checkpoint (in this fresh process), report peak RSS, footprint and logits."""
    import bitsandbytes
    import transformers
    from transformers import BitsAndBytesConfig, Mistral3ForConditionalGeneration

    from ragkit.quant import load_nf4, measure_footprint
    from ragkit.quant.nf4 import quantize_nf4

    # warm up: the first bitsandbytes op imports torch._dynamo and loads kernels (tens of MB of RSS, once)
    codes, state = quantize_nf4(torch.randn(128, 128, dtype=torch.bfloat16))
    bitsandbytes.matmul_4bit(torch.randn(1, 128, dtype=torch.bfloat16), codes.t(), quant_state=state)
    proc, peak, running = psutil.Process(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    base = proc.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if kind == "bf16":
        model = Mistral3ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    elif kind == "stock":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = Mistral3ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu",
                                                                 quantization_config=bnb)
    else:
        model = load_nf4(path, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    running[0] = False
    sampler.join()
    ids = torch.randint(20, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    fp = measure_footprint(model)
    torch.save(logits, Path(path) / f"logits_{kind}.pt")
    print(json.dumps({"load_seconds": seconds, "rss_peak_over_start": peak[0] - base, "bytes": fp.nbytes,
                      "params": fp.params, "bytes_per_param": fp.bytes_per_param,
                      "transformers": transformers.__version__}))


def measure(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "child", kind, str(path)], capture_output=True, text=True,
                         check=True, env={"HF_HUB_OFFLINE": "1", **dict(__import__("os").environ)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import bitsandbytes
    import transformers

    from ragkit.quant import write_fp8_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        bf16 = Path(tmp) / "bf16"
        build(bf16)
        ckpts = {
            "ragkit_nf4_from_bf16": ("ragkit", bf16),
            "ragkit_nf4_from_fp8_block128": ("ragkit", write_fp8_checkpoint(bf16, Path(tmp) / "fp8b", (128, 128))),
            "ragkit_nf4_from_fp8_per_tensor": ("ragkit", write_fp8_checkpoint(bf16, Path(tmp) / "fp8t", None, "static")),
            "stock_bnb_nf4_from_bf16": ("stock", bf16),
            "bf16": ("bf16", bf16),
        }
        shards = sorted(bf16.glob("*.safetensors"))
        rows = {name: measure(kind, path) for name, (kind, path) in ckpts.items()}
        ref = torch.load(bf16 / "logits_bf16.pt")
        for name, (kind, path) in ckpts.items():
            got = torch.load(path / f"logits_{kind}.pt")
            rows[name]["logits_rel_err_vs_bf16"] = ((got - ref).norm() / ref.norm()).item()
        result = {
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
                        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())},
            "model": "Mistral3 + Mistral4 text (hidden 256, 4 layers, 32 experts top-4, moe_intermediate 256) + tiny Pixtral",
            "bf16_checkpoint": {"shards": len(shards), "largest_shard_bytes": max(s.stat().st_size for s in shards),
                                "total_bytes": sum(s.stat().st_size for s in shards)},
            "rows": rows,
        }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
