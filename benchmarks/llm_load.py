"""Load time of the embedded SmolLM2 GGUF: first load (GGUF -> safetensors conversion) vs cached load.

Each load runs in a fresh Python process with torch and transformers already imported, so the
numbers are ``LocalLLM("default")`` alone (the first one in a process still imports transformers'
model code; a second load in the same process is timed too). The first load uses an empty ``RAGKIT_CACHE_DIR``;
the cached loads reuse it. Also times transformers' own GGUF load (``from_pretrained(gguf_file=)``),
which is what every load would cost without ragkit's cache.

    python benchmarks/llm_load.py                 # 1 first load, 5 cached loads
    python benchmarks/llm_load.py --cached 3 --out /tmp/llm_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from tqdm import tqdm

RESULTS = Path(__file__).parent / "results"

_LOCAL_LLM = """
import time, torch, transformers
from ragkit import LocalLLM
for _ in range(2):  # the first load in a process also imports transformers' model code; the second does not
    t, c = time.perf_counter(), time.process_time(); LocalLLM("default")
    print(time.perf_counter() - t, time.process_time() - c)
"""
_PLAIN_GGUF = """
import time, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from ragkit.models import default_llm_path
p = default_llm_path()
t, c = time.perf_counter(), time.process_time()
AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name); AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name)
print(time.perf_counter() - t, time.process_time() - c)
"""


def _timed(code: str, cache: str) -> list[tuple[float, float]]:
    """(wall seconds, CPU seconds of the process) of each load ``code`` prints, in a fresh process."""
    env = {**os.environ, "RAGKIT_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return [(float(w), float(c)) for w, c in (line.split() for line in out.stdout.split("\n") if line.strip())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cached", type=int, default=5, help="cached loads to time")
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_load.json")
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as cache:
        with tqdm(total=2 + args.cached, desc="loads") as bar:
            (plain,) = _timed(_PLAIN_GGUF, cache)
            bar.update()
            first, _ = _timed(_LOCAL_LLM, cache)
            bar.update()
            cached, warm = [], []
            for _ in range(args.cached):
                cold_load, warm_load = _timed(_LOCAL_LLM, cache)
                cached.append(cold_load)
                warm.append(warm_load)
                bar.update()
    median = statistics.median(w for w, _ in cached)
    median_cpu = statistics.median(c for _, c in cached)
    warm_wall, warm_cpu = statistics.median(w for w, _ in warm), statistics.median(c for _, c in warm)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores_visible": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": version("torch"),
            "transformers": version("transformers"),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": os.getloadavg(),
        },
        "note": "wall seconds depend on how busy the machine is (see load_avg); cpu seconds much less so",
        "seconds": {
            "transformers_gguf_load": {"wall": round(plain[0], 2), "cpu": round(plain[1], 2)},
            "ragkit_first_load_with_conversion": {"wall": round(first[0], 2), "cpu": round(first[1], 2)},
            "ragkit_cached_load_median": {"wall": round(median, 2), "cpu": round(median_cpu, 2)},
            "ragkit_cached_loads": [{"wall": round(w, 2), "cpu": round(c, 2)} for w, c in cached],
            "ragkit_cached_load_second_in_process_median": {"wall": round(warm_wall, 2), "cpu": round(warm_cpu, 2)},
        },
        "ratios": {
            "gguf_load_over_cached_load_wall": round(plain[0] / median, 1),
            "first_load_over_cached_load_wall": round(first[0] / median, 1),
            "gguf_load_over_cached_load_cpu": round(plain[1] / median_cpu, 1),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["seconds"], indent=1), json.dumps(result["ratios"], indent=1))


if __name__ == "__main__":
    main()
