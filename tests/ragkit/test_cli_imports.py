"""What each CLI verb imports: the behaviour behind the latency targets (timings: benchmarks/cli_latency.py).

``retrieve`` on the default embedder loads neither the LLM stack nor sentence-transformers nor
transformers; ``info`` loads no model library at all; ``query`` says what it is doing before its heavy
imports. Each runs the real ``ragkit`` command in a subprocess on a real index.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ragkit.pipeline import Pipeline

SQLITE = Path(__file__).resolve().parents[2] / "corpora" / "sqlite"
# run the CLI, then report which of these modules it imported (atexit runs after typer's SystemExit)
PROBE = """
import atexit, json, sys
WATCH = {watch!r}
atexit.register(lambda: sys.stderr.write("MODULES " + json.dumps([m for m in WATCH if m in sys.modules]) + "\\n"))
from ragkit.cli import main
main()
"""
LLM_STACK = ["ragkit.llm", "sentence_transformers", "transformers", "sklearn", "peft",
             "bitsandbytes", "accelerate", "torch._dynamo", "torch._inductor"]
HEAVY_IMPORT = re.compile(r"import time:.*\|\s*(torch|llama_index|transformers|faiss)(\.\S+)?\s*$")
MODEL_LIBRARIES = ["torch", "faiss", "llama_index.core", "tokenizers", "numpy", *LLM_STACK]


@pytest.fixture(scope="module")
def index(tmp_path_factory, embedder) -> Path:
    """A real index of two small corpus files, built with the default embedder."""
    root = tmp_path_factory.mktemp("cli-imports")
    docs = root / "docs"
    docs.mkdir()
    for name in ("lockingv3.txt", "about.txt"):
        shutil.copy(SQLITE / name, docs / name)
    Pipeline(root / "index", embed_model=embedder).ingest([docs], show_progress=False)
    return root / "index"


def _run(args: list[str], watch: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", PROBE.format(watch=watch), *args], capture_output=True,
                          text=True, env=env, timeout=900)
    line = [x for x in proc.stderr.splitlines() if x.startswith("MODULES ")][-1]
    return proc, json.loads(line.removeprefix("MODULES "))


def test_retrieve_loads_no_llm_and_no_transformers(index):
    proc, imported = _run(["retrieve", "What is a hot journal?", "--index", str(index)], LLM_STACK + ["torch"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("[1] score ") and "lockingv3.txt" in proc.stdout
    assert imported == ["torch"], f"retrieve imported {imported}"


def test_info_loads_no_model_library(index):
    proc, imported = _run(["info", "--index", str(index)], MODEL_LIBRARIES)
    assert proc.returncode == 0, proc.stderr
    assert "chunks" in proc.stdout
    assert imported == [], f"info imported {imported}"


def test_retrieve_errors_stay_one_line_exit_2(index, tmp_path):
    proc, _ = _run(["retrieve", "   ", "--index", str(index)], [])
    assert proc.returncode == 2 and proc.stderr.startswith("Error: the query is empty")
    assert "Traceback" not in proc.stderr
    for verb in (["retrieve", "x"], ["query", "x"], ["delete", "x"]):  # a missing index: said before any import
        proc, imported = _run([*verb, "--index", str(tmp_path / "none")], MODEL_LIBRARIES)
        assert proc.returncode == 2 and "Error: no index at " in proc.stderr and "Traceback" not in proc.stderr
        assert imported == [], f"{verb[0]} imported {imported} to say that there is no index"


def test_query_speaks_before_its_heavy_imports(index):
    """``-X importtime`` writes each import to stderr as it happens: the status line comes before torch's."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-c", PROBE.format(watch=[]), "query",
                             "What is a hot journal?", "--index", str(index)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    seen: list[str] = []
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            seen.append(line)
            if HEAVY_IMPORT.match(line):
                break
    finally:
        proc.kill()
        proc.wait()
    assert HEAVY_IMPORT.match(seen[-1]), "query never imported torch or llama_index"
    assert any(line.startswith("opening the index") for line in seen), \
        f"no status line before the first heavy import ({seen[-1].strip()})"
