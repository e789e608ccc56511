"""The real ``ragkit`` command in a subprocess: ingest / retrieve / info / delete / query, errors, --help."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SQLITE = Path(__file__).resolve().parents[2] / "corpora" / "sqlite"
RAGKIT = str(Path(sys.executable).with_name("ragkit"))


def ragkit(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([RAGKIT, *args], capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"ragkit {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert proc.stderr.startswith("Error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", ["ingest", "query", "retrieve", "info", "delete"])
def test_help(command):
    out = ragkit(command, "--help").stdout
    assert "--index" in out and "Usage" in out


def test_ingest_retrieve_info_delete(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(SQLITE / "lockingv3.txt", docs)
    (docs / "data.bin").write_bytes(b"\x00\x01")
    index = tmp_path / "ix"

    out = ragkit("ingest", str(docs), "--index", str(index))
    assert "1 added" in out.stdout and "data.bin: unsupported file type" in out.stdout
    assert "ingest: 100%" in out.stderr, "a progress bar with ETA/rate runs on stderr"

    again = ragkit("ingest", str(docs), "--index", str(index), "--quiet").stdout
    assert "0 added, 0 updated, 1 unchanged" in again and "0 chunks embedded" in again

    hits = ragkit("retrieve", "What is a hot journal?", "--index", str(index), "--top-k", "2").stdout
    assert hits.startswith("[1] score ") and "lockingv3.txt" in hits and "[3]" not in hits

    info = ragkit("info", "--index", str(index), "--files").stdout
    assert "sentence-transformers/all-MiniLM-L6-v2" in info and str(docs / "lockingv3.txt") in info

    gone = ragkit("delete", str(docs / "lockingv3.txt"), "--index", str(index)).stdout
    assert "deleted 1 document(s)" in gone and "0 chunks left" in gone
    assert_clean_error(ragkit("retrieve", "journal", "--index", str(index), check=False), "is empty")


def test_errors_are_messages_not_tracebacks(tmp_path):
    assert_clean_error(ragkit("ingest", str(tmp_path / "missing.txt"), "--index", str(tmp_path / "ix"), check=False),
                       "missing.txt: no such file or directory")
    assert_clean_error(ragkit("info", "--index", str(tmp_path / "nowhere"), check=False), "no index at")
    assert_clean_error(ragkit("retrieve", "q", "--index", str(tmp_path / "nowhere"), check=False), "ragkit ingest")


@pytest.mark.slow
def test_corrupt_index_needs_force_and_top_k_zero(tmp_path):
    (tmp_path / "a.txt").write_text("The journal makes commits atomic.")
    index = tmp_path / "ix"
    ragkit("ingest", str(tmp_path / "a.txt"), "--index", str(index))
    assert_clean_error(ragkit("retrieve", "journal", "--index", str(index), "--top-k", "0", check=False), "top_k")
    (index / "CURRENT").write_text("garbage\n")
    assert_clean_error(ragkit("ingest", str(tmp_path / "a.txt"), "--index", str(index), check=False), "--force")
    assert (index / "CURRENT").read_text() == "garbage\n"
    ragkit("ingest", str(tmp_path / "a.txt"), "--index", str(index), "--force")
    assert "chunks" in ragkit("info", "--index", str(index)).stdout


@pytest.mark.slow
def test_query_answers_with_sources(tmp_path):
    shutil.copy(SQLITE / "lockingv3.txt", tmp_path)
    index = tmp_path / "ix"
    ragkit("ingest", str(tmp_path / "lockingv3.txt"), "--index", str(index), "--quiet")
    out = ragkit("query", "What is a hot journal in SQLite?", "--index", str(index), "--show-sources",
                 "--max-new-tokens", "48").stdout
    assert "Sources:" in out and "lockingv3.txt (chunk" in out and "prompt tokens" in out


@pytest.mark.slow
def test_ingest_progress_in_a_log_is_one_line_per_refresh(tmp_path):
    """stderr is a pipe here (a log, not a TTY): progress comes as whole lines, advancing, ending at 100%."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("lockingv3.txt", "atomiccommit.txt", "testing.txt", "about.txt"):  # 131 KB: three batches
        shutil.copy(SQLITE / name, docs / name)
    proc = ragkit("ingest", str(docs), "--index", str(tmp_path / "ix"))
    assert "\r" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ingest:")]
    percents = [int(line.split("%")[0].split()[-1]) for line in lines]
    assert len(lines) >= 2 and percents == sorted(percents) and percents[-1] == 100, proc.stderr
    embedded = int(proc.stdout.split(" chunks embedded")[0].split()[-1])
    assert f"chunks={embedded}" in lines[-1], lines[-1]
