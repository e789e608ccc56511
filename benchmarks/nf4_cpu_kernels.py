"""The embedded SmolLM2 in NF4 on the CPU: bitsandbytes' packed AVX512-BF16 kernel vs the plain NF4 path.

    python benchmarks/nf4_cpu_kernels.py [--reps 3] [--prompt-tokens 512] [--new-tokens 32] [--out PATH]

Loads ``LocalLLM("default", quantization="nf4", device_map="cpu")`` twice, keeps one on the plain path
(``set_cpu_packing(model, False)``) and lets the other take the packed path where the CPU has it (what
ragkit's loaders do by default), then alternates the two: one prefill of a ``--prompt-tokens`` prompt and a
greedy decode of ``--new-tokens`` tokens each, ``--reps`` times after a warm-up. Records every timing,
medians, the ratio plain/packed, the greedy answers of both, and the weight bytes held after the first
forward. On a CPU without AVX512-BF16 both runs take the plain path and the file says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


def timed_run(llm, ids: list[int], new_tokens: int) -> dict:
    """Prefill alone, then prefill + a greedy decode of exactly ``new_tokens``; decode time is the difference."""
    tensor = torch.tensor([ids])
    with torch.inference_mode():
        start = time.perf_counter()
        llm.model(input_ids=tensor)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = llm.model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=llm.tokenizer.eos_token_id)[0, len(ids):].tolist()
        total = time.perf_counter() - start
    return {"prefill_s": prefill, "decode_s": total - prefill, "new_tokens": len(out), "ids": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "nf4_cpu_kernels.json")
    args = parser.parse_args()

    from ragkit import LocalLLM
    from ragkit.quant import measure_footprint
    from ragkit.quant.nf4 import cpu_packing_available, is_cpu_packed, set_cpu_packing

    text = Path(__file__).parents[1] / "corpora" / "sqlite" / "atomiccommit.txt"
    models = {}
    for kernel in ("packed", "plain"):
        llm = LocalLLM("default", quantization="nf4", device_map="cpu")
        set_cpu_packing(llm.model, kernel == "packed")
        models[kernel] = llm
    tokenizer = models["plain"].tokenizer
    body = tokenizer(text.read_text())["input_ids"]
    ids = models["plain"].encode_prompt(models["plain"].chat_prompt(
        tokenizer.decode(body[: args.prompt_tokens]) + "\n\nSummarise the text above in one sentence."))

    runs: dict[str, list[dict]] = {k: [] for k in models}
    for kernel, llm in models.items():  # warm-up (and, on the packed kernel, the repack)
        timed_run(llm, ids, args.new_tokens)
    for _ in range(args.reps):
        for kernel, llm in models.items():
            runs[kernel].append(timed_run(llm, ids, args.new_tokens))

    def median(kernel: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kernel])

    result = {
        "benchmark": "benchmarks/nf4_cpu_kernels.py",
        "command": "python benchmarks/nf4_cpu_kernels.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": {"cpu": cpu_name(), "avx512_bf16": cpu_packing_available(), "cores_visible": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_avg_at_start": os.getloadavg(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "versions": {p: version(p) for p in ("torch", "transformers", "bitsandbytes")},
        "model": "embedded SmolLM2-135M-Instruct, NF4 (double quant), compute bf16, device cpu",
        "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "reps": args.reps,
        "layers_packed": {k: sum(is_cpu_packed(m) for m in llm.model.modules()) for k, llm in models.items()},
        "weight_bytes_after_first_forward": {k: measure_footprint(llm.model).nbytes for k, llm in models.items()},
        "runs": {k: [{key: r[key] for key in ("prefill_s", "decode_s", "new_tokens")} for r in v]
                 for k, v in runs.items()},
        "median": {k: {"prefill_s": median(k, "prefill_s"), "decode_s": median(k, "decode_s"),
                       "decode_tok_s": args.new_tokens / median(k, "decode_s")} for k in runs},
        "ratio_plain_over_packed": {
            "prefill": median("plain", "prefill_s") / median("packed", "prefill_s"),
            "decode": median("plain", "decode_s") / median("packed", "decode_s")},
        "same_greedy_answer": runs["packed"][0]["ids"] == runs["plain"][0]["ids"],
        "answers": {k: tokenizer.decode(v[0]["ids"]) for k, v in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median", "ratio_plain_over_packed", "same_greedy_answer",
                                            "layers_packed")}, indent=2))


if __name__ == "__main__":
    main()
