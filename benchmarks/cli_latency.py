"""Wall and CPU time of the ``ragkit`` CLI verbs on the embedded defaults, as a user runs them.

Builds an index of one corpus file once (not timed), or opens ``--index`` (e.g. one built with
``ragkit ingest corpora/sqlite``), then runs each verb as a real subprocess ``--reps`` times: ``info``,
``retrieve`` and ``query`` (plus the time until a verb first writes anything to stderr or stdout, i.e.
how long the user waits in silence). Every run records its wall time, the child's CPU seconds
(user + sys: robust to a loaded machine, unlike wall time) and ``os.getloadavg()`` before and after it
(the machine is shared). Results (machine, versions, every timing, medians) go to
``benchmarks/results/cli_latency_<label>.json`` and ``.md``.

    python benchmarks/cli_latency.py --label before
    python benchmarks/cli_latency.py --label after --query-reps 3 --index /tmp/sqlite-index
    RAGKIT_CODE_LABEL=base PYTHONPATH=/path/to/old/checkout python benchmarks/cli_latency.py --label old --verbs info retrieve
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CORPUS_FILE = ROOT / "corpora" / "sqlite" / "lockingv3.txt"
RAGKIT = [sys.executable, "-c", "from ragkit.cli import main; main()"]


def run_timed(args: list[str]) -> dict[str, float]:
    """Run ``ragkit ARGS``; wall seconds, children's CPU seconds, and seconds to the first output byte."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    first: list[float] = []
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen([*RAGKIT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    def watch(stream) -> None:  # type: ignore[no-untyped-def]
        while chunk := stream.read(1):
            if not first:
                first.append(time.perf_counter() - start)
            stream.read()  # drain the rest

    threads = [threading.Thread(target=watch, args=(s,)) for s in (proc.stdout, proc.stderr)]
    for t in threads:
        t.start()
    rc = proc.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise SystemExit(f"ragkit {' '.join(args)} exited {rc}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "first_output_s": round(first[0] if first else wall, 3),
            "load1_before": round(load_before, 2), "load1_after": round(os.getloadavg()[0], 2)}


def _describe(index: str) -> str:
    """Files and chunks of a prebuilt index (no machine path)."""
    from ragkit.index_info import describe

    info = describe(index)
    return f"{info['sources']} files, {info['chunks']} chunks, {info['chunk_tokens']}-token chunks"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True, help="name of this measurement (before/after)")
    ap.add_argument("--reps", type=int, default=3, help="runs of info and retrieve")
    ap.add_argument("--query-reps", type=int, default=1, help="runs of query (each loads the LLM)")
    ap.add_argument("--index", type=Path, help="an existing index to time [default: build one of one file]")
    ap.add_argument("--verbs", nargs="+", default=["info", "retrieve", "query"], help="verbs to time")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        index = str(args.index or Path(tmp) / "ix")
        if args.index is None:
            run_timed(["ingest", str(CORPUS_FILE), "--index", index, "--quiet"])
        verbs = {
            "info": (["info", "--index", index], args.reps),
            "retrieve": (["retrieve", "What is a hot journal?", "--index", index], args.reps),
            "query": (["query", "What is a hot journal?", "--index", index, "--max-new-tokens", "32"],
                      args.query_reps),
        }
        rows = []
        for verb, (argv, reps) in ((v, verbs[v]) for v in args.verbs):
            for rep in range(reps):
                rows.append({"verb": verb, "rep": rep, **run_timed(argv)})
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    medians = table.groupby("verb", sort=False)[["wall_s", "cpu_s", "first_output_s", "load1_before"]].median()

    import torch
    import transformers

    result = {
        "label": args.label,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "index": "prebuilt (--index): " + _describe(index) if args.index else str(CORPUS_FILE.relative_to(ROOT)),
        "ragkit_code": os.environ.get("RAGKIT_CODE_LABEL", "this checkout"),
        "runs": rows,
        "medians": medians.reset_index().to_dict(orient="records"),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cli_latency_{args.label}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(
        f"# ragkit CLI latency ({args.label})\n\n{result['machine']}\n\nMedians (s):\n\n"
        f"```\n{medians.to_string()}\n```\n\nEvery run:\n\n```\n{table.to_string(index=False)}\n```\n"
    )
    print(medians.to_string())


if __name__ == "__main__":
    main()
