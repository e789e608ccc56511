"""Wall time of the needle runner (prefix-cache reuse, batched decoding) vs a naive loop calling generate() per cell.

Same model, same grid, same prompts; the answers must be identical (greedy). Writes
benchmarks/results/needle_runner_<model>_<device>_bs<batch>_<lengths>_<quant>.json and .md with the machine,
versions, every timing, medians and ratio.

    python -m benchmarks.needle_runner --lengths 1k --depths 5 --seeds 1,2 --repeats 1 --threads 1
    python -m benchmarks.needle_runner --device cuda --batch-size 8 --random-smollm2 .bench/smol --lengths 4k ...

``--random-smollm2 DIR``: SmolLM2-135M-Instruct's own config and tokenizer with random weights (seed 0), for a
machine the embedded GGUF cannot reach. DIR gets the tokenizer and config from the embedded model when it lacks
them, and random weights when it lacks model.safetensors. Write the small part where the embedded model is
(``--random-smollm2 DIR --prepare-only``: 3.5 MB), carry DIR, and let the run on the GPU machine write the
weights (540 MB). Random weights rarely say EOS, so every cell decodes its whole generation budget: more decode
steps per cell than the real model's short answers (the results record the mean answer length).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from evals.core.decode import GreedyDecoder, default_batch_size
from evals.needle.haystack import SentencePool
from evals.needle.suite import NeedleSettings, NeedleSuite, haystack_paths, load_pools
from evals.core.runner import run
from evals.core.store import RunDir, versions
from evals.core.targets import load_target

OUT = Path(__file__).resolve().parent / "results"
TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja")


def random_smollm2(path: Path, weights: bool = True) -> Path:
    """``path`` holding SmolLM2-135M-Instruct's config + tokenizer, and random weights (see module doc)."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "tokenizer.json").exists():
        from ragkit import models

        src = models.local_dir(models.resolve_llm("default"))
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, path / name)
    if weights and not (path / "model.safetensors").exists():
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).save_pretrained(path)
    return path


def naive(suite: NeedleSuite, target) -> tuple[dict[str, str], list[int]]:
    """Build each cell's prompt and call generate() on it, one cell after the other."""
    answers, lengths = {}, []
    for cell in suite.cells():
        ids = target.generate_naive(suite._job(cell).ids, suite.max_new_tokens)
        answers[cell.cell_id] = target.decode(ids)
        lengths.append(len(ids))
    return answers, lengths


def runner(suite: NeedleSuite, target, batch_size: int) -> tuple[dict[str, str], list[int]]:
    """The suite's runner (groups by length, shares the haystack prefix's KV cache, decodes ``batch_size`` cells
    together), rows to a temp run dir."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = run(suite, target, RunDir(tmp), {}, show_progress=False, batch_size=batch_size)
        return {r["cell_id"]: r["answer"] for r in stats.rows}, [r["answer_tokens"] for r in stats.rows]


def warm_up(suite: NeedleSuite, target, batch_size: int) -> None:
    """Both paths once on two short prompts, so that neither timing pays for first-call setup (CUDA context,
    kernels, allocator)."""
    ids = suite._job(suite.cells()[0]).ids[:64]
    target.generate_naive(ids, 4)
    list(GreedyDecoder(target.model, target.eos_ids, 4, batch_size).run_group([ids, ids[:48]], ids))


def timed(fn) -> tuple[float, float, tuple[dict[str, str], list[int]]]:
    """Wall seconds, CPU seconds of this process (robust on a shared machine), result."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return time.perf_counter() - w, time.process_time() - c, out


def slug(model: str, random_dir: str | None) -> str:
    if random_dir:
        return "random-smollm2"
    return "smollm2" if model == "default" else Path(model.rstrip("/")).name.replace("/", "-")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="1k")
    p.add_argument("--depths", default="5")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quant", default="none")
    p.add_argument("--model", default="default", help="default (embedded SmolLM2), a model directory or hub id")
    p.add_argument("--random-smollm2", metavar="DIR", help="SmolLM2's config + tokenizer with random weights, "
                   "written to DIR where missing (see module doc); replaces --model")
    p.add_argument("--prepare-only", action="store_true", help="with --random-smollm2: write only DIR's config "
                   "and tokenizer (from the embedded model), then exit")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: cuda when present, else cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="runner's decode batch (default: 8 CUDA, 1 CPU)")
    a = p.parse_args()
    if a.prepare_only:
        if not a.random_smollm2:
            p.error("--prepare-only needs --random-smollm2 DIR")
        print(f"config and tokenizer in {random_smollm2(Path(a.random_smollm2), weights=False)}")
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    model = str(random_smollm2(Path(a.random_smollm2))) if a.random_smollm2 else a.model
    s = NeedleSettings(lengths=a.lengths, depths=a.depths, seeds=a.seeds, quant=a.quant, model=model,
                       device=a.device, batch_size=a.batch_size, progress=False)
    target = load_target(s.model, s.quant, s.dtype, s.device, s.max_new_tokens)
    batch = a.batch_size or default_batch_size(next(target.model.parameters()).device)
    device = torch.device(target.info["device"]).type
    suite = NeedleSuite(s, target, load_pools(s), RunDir(tempfile.mkdtemp()), {"context": s.lengths, "rag": ()})
    warm_up(suite, target, batch)
    times: dict[str, list[float]] = {"naive": [], "runner": []}
    cpu: dict[str, list[float]] = {"naive": [], "runner": []}
    answer_tokens: dict[str, list[int]] = {}
    identical = True
    paths = {"runner": lambda: runner(suite, target, batch), "naive": lambda: naive(suite, target)}
    for i in range(a.repeats):
        for name in ("runner", "naive") if i % 2 == 0 else ("naive", "runner"):
            dt, dc, (answers, answer_tokens[name]) = timed(paths[name])
            times[name].append(round(dt, 2))
            cpu[name].append(round(dc, 2))
            print(f"repeat {i + 1} {name}: {dt:.1f} s wall, {dc:.1f} s CPU", flush=True)
            if name == "naive":
                ref = answers
            else:
                got = answers
        identical &= got == ref
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    cells = suite.cells()
    mean_answer = statistics.mean(answer_tokens["runner"])
    gpu = torch.cuda.get_device_name(torch.device(target.info["device"])) if device == "cuda" else None
    model_name = (f"random-weight SmolLM2-135M-Instruct shape ({model})" if a.random_smollm2
                  else target.info["loaded_from"])
    result = {
        "grid": {"lengths": list(s.lengths), "depths": list(s.depths), "seeds": list(s.seeds),
                 "needle": s.needle, "cells": len(cells), "controls": True, "max_new_tokens": s.max_new_tokens},
        "model": {**target.info, "random_weights": bool(a.random_smollm2)}, "device": device, "gpu": gpu,
        "batch_size": batch, "threads": torch.get_num_threads(), "mean_answer_tokens": round(mean_answer, 2),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_avg_at_end": os.getloadavg()},
        "versions": versions(), "seconds": times, "median_seconds": med, "cpu_seconds": cpu,
        "median_cpu_seconds": med_cpu,
        "speedup_naive_over_runner": round(med["naive"] / med["runner"], 3),
        "cpu_speedup_naive_over_runner": round(med_cpu["naive"] / med_cpu["runner"], 3),
        "identical_answers": identical, "answers": {c.cell_id: {**c.coords, "answer": got[c.cell_id]} for c in cells},
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    OUT.mkdir(exist_ok=True)
    stem = (f"needle_runner_{slug(a.model, a.random_smollm2)}_{device}_bs{batch}_"
            f"{'-'.join(str(n) for n in s.lengths)}_{a.quant}")
    (OUT / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (OUT / f"{stem}.md").write_text(
        f"# needle runner vs naive generate loop\n\n"
        f"- grid: lengths {list(s.lengths)}, depths {list(s.depths)}, seeds {list(s.seeds)}, "
        f"{len(cells)} cells incl. no-needle controls; needle {s.needle}; max_new_tokens {s.max_new_tokens}, "
        f"mean answer {mean_answer:.1f} tokens\n"
        f"- model: {model_name} quant {s.quant} dtype {target.info['dtype']}\n"
        f"- device: {target.info['device']}{f' ({gpu})' if gpu else ''}; runner decode batch size {batch}; "
        f"torch threads {torch.get_num_threads()}\n"
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, load average at end {os.getloadavg()[0]:.1f} "
        f"(shared with other jobs)\n"
        f"- versions: torch {result['versions']['torch']}, transformers {result['versions']['transformers']}\n"
        f"- repeats: {a.repeats} (order alternates; one warm-up of both paths first); wall seconds naive "
        f"{times['naive']}, runner {times['runner']}; CPU seconds naive {cpu['naive']}, runner {cpu['runner']}\n\n"
        f"| path | median wall time (s) | median CPU time (s) |\n|---|---|---|\n"
        f"| naive generate() per cell | {med['naive']:.1f} | {med_cpu['naive']:.1f} |\n"
        f"| evals runner (prefix KV reuse, decode batch {batch}) | {med['runner']:.1f} | {med_cpu['runner']:.1f} |\n\n"
        f"**Speedup {result['speedup_naive_over_runner']:.2f}x wall, {result['cpu_speedup_naive_over_runner']:.2f}x "
        f"CPU; identical greedy answers: {identical}.**\n")
    print(json.dumps({k: result[k] for k in ("device", "batch_size", "median_seconds", "median_cpu_seconds",
                                             "speedup_naive_over_runner", "cpu_speedup_naive_over_runner",
                                             "identical_answers")}))
    print(f"results: {OUT / stem}.json, .md")


if __name__ == "__main__":
    main()
