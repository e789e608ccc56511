"""JSON answers in the needle suite on CPU: free vs constrained (xgrammar) decoding, SmolLM2 fp32 and NF4.

Per model: one needle run (``--answer-format json --constrained both``, one seed, no controls) gives the JSON-valid
and found rates, free vs constrained, per length (the run directory is kept: report.md, summary.csv, rows).
Then the per-token decode cost of the grammar: at each length the 50%-depth prompt of the run is prefilled once
and answered free and constrained, alternately, ``--runs`` times each on that cache (the decoder's same-prompt
reuse: no prefill is timed); seconds per token = the answer's decode seconds / its tokens; ratio = constrained /
free of each run, and the median of the runs. The load average is recorded next to every timing (the machine is
shared).

    python benchmarks/structured_suite.py --quants none,nf4 --lengths 1k,2k,4k --depths 5 --runs 3 --threads 1

writes benchmarks/results/structured_suite/{fp32,nf4}/ (the needle runs) and <quants>.{json,md} (rates, timings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from evals.core.decode import GreedyDecoder
from evals.core.spec import Cell
from evals.core.store import versions
from evals.core.targets import load_target
from evals.needle.haystack import Estimator
from evals.needle.needles import make_needle
from evals.needle.suite import NeedleSettings, build_cell, execute, load_pools
from evals.needle.token_cache import TOKENS_DIR

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = {"none": "fp32", "nf4": "nf4"}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timings(target, settings: NeedleSettings, runs: int) -> list[dict]:
    """Per length: ``runs`` free and ``runs`` constrained answers to the 50%-depth prompt, decode s/token each."""
    pool = next(iter(load_pools(settings).values()))
    est = Estimator(target.codec, pool)
    schema = make_needle(settings.needle, 1).schema
    out = []
    for length in tqdm(settings.lengths, desc="decode timing", mininterval=10):
        cell = Cell("needle", "timing", {"length": length, "seed": 1, "depth": 50.0})
        ids = build_cell(target.codec, pool, est, settings, cell)[2].ids
        processors = [None if i % 2 == 0 else target.json_processor(schema) for i in range(2 * runs)]
        decoder = GreedyDecoder(target.model, target.eos_ids, settings.max_new_tokens, batch_size=1)
        before = load()
        got = sorted(decoder.run_group([ids] * (2 * runs), ids, processors), key=lambda d: d.index)
        after = load()
        for r in range(runs):
            free, grammar = got[2 * r], got[2 * r + 1]
            pf, pg = (d.decode_seconds / max(1, len(d.new_ids)) for d in (free, grammar))
            out.append({"length": length, "prompt_tokens": len(ids), "run": r + 1, "free_tokens": len(free.new_ids),
                        "constrained_tokens": len(grammar.new_ids), "free_s_per_token": round(pf, 5),
                        "constrained_s_per_token": round(pg, 5), "ratio": round(pg / pf, 3),
                        "loadavg_before": before, "loadavg_after": after})
    return out


def rates(rows: list[dict]) -> pd.DataFrame:
    """Needle cells per (length, decoding): JSON parses / valid / only the object / found (strict, lenient)."""
    df = pd.DataFrame(rows)
    df = df[df["kind"] == "needle"]
    df["s_per_token"] = df["decode_seconds"] / df["answer_tokens"].clip(lower=1)
    return df.groupby(["length", "decoding"]).agg(
        cells=("found", "size"), parses=("json_parses", "sum"), valid=("json_valid", "sum"), only=("json_only", "sum"),
        found=("found", "sum"), found_lenient=("found_lenient", "sum"), cell_s_per_token=("s_per_token", "median"),
    ).reset_index()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quants", default="none,nf4")
    p.add_argument("--lengths", default="1k,2k,4k")
    p.add_argument("--depths", default="5")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "structured_suite")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "torch_threads": args.threads, "versions": versions(
                  ("ragkit", "torch", "transformers", "bitsandbytes", "xgrammar")),
              "command": "python benchmarks/structured_suite.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"), "models": {}}
    md = [f"# JSON answers in the needle suite, free vs constrained ({record['date']})", "",
          f"`{record['command']}` · {record['machine']}, {record['cpus']} CPUs, {args.threads} torch thread(s) · "
          f"`{json.dumps(record['versions'])}`", ""]
    for quant in args.quants.split(","):
        name = NAMES.get(quant, quant)
        run_dir = args.out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        target = load_target("default", quant, max_new_tokens=32)
        settings = NeedleSettings(lengths=args.lengths, depths=args.depths, answer_format="json", constrained="both",
                                  controls=False, out=str(run_dir), threads=args.threads, progress=False)
        t0, before = time.perf_counter(), load()
        execute(settings, target)
        run_seconds, after = time.perf_counter() - t0, load()
        shutil.rmtree(run_dir / TOKENS_DIR, ignore_errors=True)  # a cache, not a result
        rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
        table = rates(rows)
        timing = pd.DataFrame(timings(target, settings, args.runs))
        ratio = timing.groupby("length").agg(
            free_s_per_token=("free_s_per_token", "median"), constrained_s_per_token=("constrained_s_per_token", "median"),
            ratio_median=("ratio", "median"), ratio_min=("ratio", "min"), ratio_max=("ratio", "max"), runs=("run", "count"),
        ).reset_index()
        record["models"][name] = {"quant": quant, "run_dir": str(run_dir.relative_to(args.out.parent)),
                                  "run_seconds": round(run_seconds, 1), "run_loadavg_before": before,
                                  "run_loadavg_after": after, "rates": table.to_dict("records"),
                                  "timings": timing.to_dict("records"), "ratios": ratio.to_dict("records")}
        md += [f"## SmolLM2-135M-Instruct {name} (CPU)", "",
               f"Needle run `{run_dir.relative_to(args.out.parent)}` ({run_seconds:.0f} s, load average {before} -> {after}); "
               "needle cells per length and decoding:", "", "```", table.to_string(index=False), "```", "",
               f"Decode seconds per token, 50%-depth prompt, {args.runs} alternating runs each (ratio = constrained / "
               "free):", "", "```", ratio.to_string(index=False), "```", "", "```",
               timing.to_string(index=False), "```", ""]
        del target
    stem = args.out / "_".join(NAMES.get(q, q) for q in args.quants.split(","))
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
