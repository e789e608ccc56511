"""Wall time of the needle runner (prefix-cache reuse) vs a naive loop calling generate() per cell.

Same model, same grid, same prompts; the answers must be identical (greedy). Writes
benchmarks/results/needle_runner_<lengths>_<quant>.json and .md with the machine, versions, every timing, medians and ratio.

    python benchmarks/needle_runner.py --lengths 1k --depths 5 --seeds 1,2 --repeats 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from evals.haystack import SentencePool
from evals.needle import NeedleSettings, NeedleSuite, haystack_paths
from evals.runner import run
from evals.store import RunDir, versions
from evals.targets import load_target

OUT = Path(__file__).resolve().parent / "results"


def naive(suite: NeedleSuite, target) -> dict[str, str]:
    """Build each cell's prompt and call generate() on it, one cell after the other."""
    answers = {}
    for cell in suite.cells():
        job = suite._job(cell)
        answers[cell.cell_id] = target.decode(target.generate_naive(job.ids, suite.max_new_tokens))
    return answers


def runner(suite: NeedleSuite, target) -> dict[str, str]:
    """The suite's runner (groups by length, shares the haystack prefix's KV cache), rows to a temp run dir."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = run(suite, target, RunDir(tmp), {}, show_progress=False)
        return {r["cell_id"]: r["answer"] for r in stats.rows}


def timed(fn, *args) -> tuple[float, float, dict[str, str]]:
    """Wall seconds, CPU seconds of this process (robust on a shared machine), result."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - w, time.process_time() - c, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="1k")
    p.add_argument("--depths", default="5")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quant", default="none")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    s = NeedleSettings(lengths=a.lengths, depths=a.depths, seeds=a.seeds, quant=a.quant, progress=False)
    target = load_target(s.model, s.quant, s.dtype, None, s.max_new_tokens)
    pool = SentencePool.from_paths(haystack_paths(s.haystack))
    suite = NeedleSuite(s, target, pool, RunDir(tempfile.mkdtemp()), {"context": s.lengths, "rag": ()})
    times: dict[str, list[float]] = {"naive": [], "runner": []}
    cpu: dict[str, list[float]] = {"naive": [], "runner": []}
    identical = True
    for i in range(a.repeats):
        for name, fn in (("runner", runner), ("naive", naive)) if i % 2 == 0 else (("naive", naive), ("runner", runner)):
            dt, dc, answers = timed(fn, suite, target)
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
    result = {
        "grid": {"lengths": list(s.lengths), "depths": list(s.depths), "seeds": list(s.seeds),
                 "needle": s.needle, "cells": len(cells), "controls": True},
        "model": target.info, "threads": torch.get_num_threads(),
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
    stem = f"needle_runner_{'-'.join(str(n) for n in s.lengths)}_{a.quant}"
    (OUT / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (OUT / f"{stem}.md").write_text(
        f"# needle runner vs naive generate loop\n\n"
        f"- grid: lengths {list(s.lengths)}, depths {list(s.depths)}, seeds {list(s.seeds)}, "
        f"{len(cells)} cells incl. no-needle controls; needle {s.needle}\n"
        f"- model: {target.info['loaded_from']} quant {s.quant} dtype {target.info['dtype']} on "
        f"{target.info['device']}, torch threads {torch.get_num_threads()}\n"
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, load average at end {os.getloadavg()[0]:.1f} "
        f"(shared with other jobs)\n"
        f"- versions: torch {result['versions']['torch']}, transformers {result['versions']['transformers']}\n"
        f"- repeats: {a.repeats}; wall seconds naive {times['naive']}, runner {times['runner']}; "
        f"CPU seconds naive {cpu['naive']}, runner {cpu['runner']}\n\n"
        f"| path | median wall time (s) | median CPU time (s) |\n|---|---|---|\n"
        f"| naive generate() per cell | {med['naive']:.1f} | {med_cpu['naive']:.1f} |\n"
        f"| evals runner (prefix KV reuse) | {med['runner']:.1f} | {med_cpu['runner']:.1f} |\n\n"
        f"**Speedup {result['speedup_naive_over_runner']:.2f}x wall, {result['cpu_speedup_naive_over_runner']:.2f}x "
        f"CPU; identical greedy answers: {identical}.**\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "median_cpu_seconds", "speedup_naive_over_runner",
                                             "cpu_speedup_naive_over_runner", "identical_answers")}))


if __name__ == "__main__":
    main()
