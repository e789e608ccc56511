"""Needle cells per second against a local OpenAI-compatible server at concurrency 1, 2, 4.

Starts ``transformers serve`` with the embedded SmolLM2-135M-Instruct on loopback (ragkit.serving.LocalServer),
then runs the same small needle grid with ``--backend openai --concurrency N`` for each level (a fresh run
directory each time, so nothing is resumed) and, for reference, the in-process backend (prefix-sharing decoder).
Reports wall seconds, cells/s, the median per-cell request latency, and checks that every level gave the same
answers. Results: benchmarks/results/serving_concurrency.{json,md}.

    python benchmarks/serving_concurrency.py                          # lengths 512, 3 depths, 2 seeds
    python benchmarks/serving_concurrency.py --continuous-batching    # the server batches concurrent requests
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from evals.needle.suite import NeedleSettings, execute
from evals.core.portable import portable_value
from ragkit.remote import OpenAICompatibleLLM
from ragkit.serving import LocalServer

RESULTS = Path(__file__).parent / "results"


def run_grid(args: argparse.Namespace, out: Path, **backend: object) -> dict:
    settings = NeedleSettings(lengths=args.lengths, depths=args.depths, seeds=args.seeds,
                              max_new_tokens=args.max_new_tokens, out=str(out), progress=False, **backend)
    t0 = time.perf_counter()
    execute(settings)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {"cells": len(rows), "wall_s": round(wall, 2), "cells_per_s": round(len(rows) / wall, 4),
            "median_cell_s": round(statistics.median(r["seconds"] for r in rows), 3),
            "mismatched_cells": sum(bool(r.get("prompt_tokens_mismatch")) for r in rows),
            "answers": {f"{r['mode']}/{r['length']}/s{r['seed']}/{r['depth']}": r["answer"] for r in rows}}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": cpu, "cores_visible": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": {p: metadata.version(p) for p in ("torch", "transformers", "openai", "fastapi", "uvicorn")}}


def markdown(result: dict) -> str:
    m, a = result["machine"], result["args"]
    lines = [
        "# Needle cells per second against a local OpenAI-compatible server",
        "",
        f"- Date: {result['date']}; command: `python benchmarks/serving_concurrency.py "
        f"{' '.join(result['argv'])}`",
        f"- Machine: {m['cpu']}, {m['cores_visible']} cores shared with other jobs (load average 1/5/15 min "
        f"{result['load_before']} before, {result['load_after']} after); {m['platform']}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"- Server: `transformers serve` (continuous batching: {a['continuous_batching']}), SmolLM2-135M-Instruct "
        f"float32 on CPU, {a['threads']} torch thread(s), started in {result['server_startup_s']} s; the client "
        "(this process: prompts, HTTP, scoring) runs beside it on the same cores",
        f"- Grid: lengths {a['lengths']}, depths {a['depths']}, seeds {a['seeds']}, controls on, "
        f"max_new_tokens {a['max_new_tokens']}: {result['levels'][0]['cells']} cells per run, {a['repeats']} run(s) "
        "per level (median shown)",
        "",
        "| backend | concurrency | wall s | cells/s | vs concurrency 1 | median s per cell | token mismatches |",
        "|---|---|---|---|---|---|---|",
    ]
    base = result["levels"][0]["cells_per_s"]
    for lv in result["levels"]:
        lines.append(f"| openai (server) | {lv['concurrency']} | {lv['wall_s']} | {lv['cells_per_s']} | "
                     f"{lv['cells_per_s'] / base:.2f}x | {lv['median_cell_s']} | {lv['mismatched_cells']} |")
    if result.get("local"):
        lv = result["local"]
        lines.append(f"| local (in-process, prefix sharing) | 1 | {lv['wall_s']} | {lv['cells_per_s']} | "
                     f"{lv['cells_per_s'] / base:.2f}x | {lv['median_cell_s']} | - |")
    lines += ["", f"Answers identical at every concurrency level: {result['identical_answers']}; "
              f"in-process answers equal the server's: {result.get('local_matches_server', 'not run')}.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="512")
    p.add_argument("--depths", default="0,50,100")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--levels", default="1,2,4")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--continuous-batching", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the in-process run")
    p.add_argument("--no-local", dest="local", action="store_false", help="skip the in-process reference run")
    p.add_argument("--out", type=Path, default=RESULTS / "serving_concurrency.json")
    args = p.parse_args()
    result: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                    "argv": portable_value(sys.argv[1:]), "args": portable_value(vars(args) | {"out": str(args.out)}),
                    "load_before": [round(x, 2) for x in os.getloadavg()], "levels": []}
    with tempfile.TemporaryDirectory() as tmp, LocalServer("default", threads=args.threads,
                                                           continuous_batching=args.continuous_batching) as server:
        result["server_startup_s"] = round(server.startup_seconds or 0, 1)
        backend = {"backend": "openai", "base_url": server.base_url}
        OpenAICompatibleLLM(server.base_url).complete("Hi", max_new_tokens=4)  # first-request costs out of the timings
        for level in map(int, args.levels.split(",")):
            runs = [run_grid(args, Path(tmp) / f"c{level}-{i}", **backend, concurrency=level)
                    for i in range(args.repeats)]
            best = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
            result["levels"].append({"concurrency": level, **best, "wall_s_all": [r["wall_s"] for r in runs]})
        if args.local:
            result["local"] = run_grid(args, Path(tmp) / "local", threads=args.threads)
    answers = [lv.pop("answers") for lv in result["levels"]]
    result["identical_answers"] = all(a == answers[0] for a in answers)
    if result.get("local"):
        local = result["local"].pop("answers")
        result["local_matches_server"] = local == answers[0]
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
