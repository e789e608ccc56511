"""Time to build a needle length's prompts (exact-length fit, control, offsets) with the runs' codec over SmolLM2:
a fresh run directory vs a resumed one whose ``tokens/`` cache holds the texts (evals/needle/token_cache.py).

    python -m benchmarks.prompt_build --length 32768 --out benchmarks/results/prompt_build.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from evals.core.spec import Cell
from evals.core.targets import LLMCodec, tokenizer_fingerprint
from evals.needle.haystack import Estimator, SentencePool
from evals.needle.suite import NeedleSettings, build_cell, haystack_paths
from evals.needle.token_cache import CachedCodec
from ragkit import LocalLLM


def build_all(codec, pool, s: NeedleSettings, length: int) -> float:
    t = time.perf_counter()
    est = Estimator(codec, pool)
    for depth in [*s.depths, None]:
        build_cell(codec, pool, est, s, Cell("needle", "x", {"length": length, "seed": 1, "depth": depth,
                                                             "mode": "context", "needle": s.needle}))
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    llm = LocalLLM("default")
    tok = llm.tokenizer
    s = NeedleSettings(lengths=str(a.length))
    pool = SentencePool.from_paths(haystack_paths(s.haystack))
    plain = LLMCodec(llm)
    with tempfile.TemporaryDirectory() as d:
        uncached = build_all(plain, pool, s, a.length)
        first = CachedCodec(plain, Path(d) / "tokens", tokenizer_fingerprint(tok))
        fresh_run = build_all(first, pool, s, a.length)
        resumed = CachedCodec(plain, Path(d) / "tokens", tokenizer_fingerprint(tok))
        resumed_run = build_all(resumed, pool, s, a.length)
    res = {"length": a.length, "cells": len(s.depths) + 1, "no_cache_s": uncached, "fresh_run_s": fresh_run,
           "fresh_run_hits": first.hits, "fresh_run_misses": first.misses, "resumed_run_s": resumed_run,
           "resumed_misses": resumed.misses, "machine": platform.platform(), "python": platform.python_version()}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
