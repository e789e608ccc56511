"""The real ``ragkit`` command in subprocesses: an index built with --embed-model DIR opens without it;
read-only index, bad --chunk-tokens, held lock: one ``Error:`` line, exit 2, nothing changed (issue 20)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ragkit.models import default_embedder_path
from ragkit.store import IndexDirectory

ONE_LINE_ERROR_EXIT = 2
ROOT = next(p for p in Path(__file__).resolve().parents if (p / "corpora").is_dir())  # the repository, wherever tests/ nests this file
SQLITE = ROOT / "corpora" / "sqlite"
RAGKIT = str(Path(sys.executable).with_name("ragkit"))


def ragkit(*args: str, user: int | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    prefix = [] if user is None else ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return subprocess.run([*prefix, RAGKIT, *args], capture_output=True, text=True, env=full_env, timeout=900)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == ONE_LINE_ERROR_EXIT, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A world-readable directory with a copy of MiniLM, a document and an index built with --embed-model."""
    root = Path(tempfile.mkdtemp(prefix="ragkit-cli-"))
    root.chmod(0o755)
    shutil.copytree(default_embedder_path(), root / "models" / "mini")
    (root / "docs").mkdir()
    shutil.copy(SQLITE / "threadsafe.txt", root / "docs")
    index = root / "ix"
    built = ragkit("ingest", str(root / "docs"), "--index", str(index), "--embed-model", str(root / "models" / "mini"))
    assert built.returncode == 0, built.stderr
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_verbs_open_an_index_built_with_embed_model_without_it(shared):
    index = str(shared / "ix")
    info = ragkit("info", "--index", index)
    assert info.returncode == 0 and "mini" in info.stdout, info.stderr
    hits = ragkit("retrieve", "Is SQLite threadsafe?", "--index", index, "--top-k", "1")
    assert hits.returncode == 0 and "threadsafe.txt" in hits.stdout, hits.stderr


def test_read_only_index_is_one_error_line_and_unchanged(shared):
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root ignores file modes and setpriv is missing to drop to another user")
    user = 65534 if os.geteuid() == 0 else None  # root writes anywhere: run the command as nobody
    closed = [d for d in Path(RAGKIT).parents if not d.stat().st_mode & stat.S_IXOTH]
    if user is not None and closed:  # e.g. a clone under `mktemp -d` (mode 0700): nobody cannot reach the venv
        pytest.skip(f"user nobody cannot reach {RAGKIT}: {closed[-1]} is not searchable by others; "
                    f"`chmod o+x {closed[-1]}` to run this test")
    index = shared / "ix"
    ro = shared / "ro"
    shutil.copytree(index, ro)
    for p in [ro, *ro.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = _tree(ro)
    home = Path(tempfile.mkdtemp(prefix="ragkit-home-"))
    home.chmod(0o777)
    try:
        env = {"HOME": str(home)}
        nothing_to_change = ragkit("ingest", str(shared / "docs"), "--index", str(ro), user=user, env=env)
        assert_one_line_error(nothing_to_change, f"index directory {ro} is not writable", "chmod u+w")
        delete = ragkit("delete", str(shared / "docs" / "threadsafe.txt"), "--index", str(ro), user=user, env=env)
        assert_one_line_error(delete, "is not writable", "nothing was changed")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert _tree(ro) == before


@pytest.mark.parametrize("bad", ["5", "-5", "100000"])
def test_chunk_tokens_out_of_range_is_one_error_line(tmp_path, bad):
    (tmp_path / "a.txt").write_text("The journal makes commits atomic.")
    proc = ragkit("ingest", str(tmp_path / "a.txt"), "--index", str(tmp_path / "ix"), "--chunk-tokens", bad)
    assert_one_line_error(proc, f"--chunk-tokens) {bad} is out of range", "max_seq_length 256")
    assert not (tmp_path / "ix" / "CURRENT").exists()


def test_held_lock_names_the_holder_and_lock_timeout_waits(shared, tmp_path):
    index = tmp_path / "ix"
    shutil.copytree(shared / "ix", index)
    with IndexDirectory(index).lock():
        before = _tree(index)
        locked = ragkit("ingest", str(shared / "docs"), "--index", str(index))
        assert_one_line_error(locked, f"locked by process {os.getpid()}", "--lock-timeout SECONDS")
        assert _tree(index) == before
        waiter = subprocess.Popen([RAGKIT, "ingest", str(shared / "docs"), "--index", str(index), "--lock-timeout",
                                   "600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, HF_HUB_OFFLINE="1"))
        seen = []  # the waiter says it waits, and for whom, before it waits
        while not seen or ("is locked by process" not in seen[-1] and seen[-1]):
            seen.append(waiter.stderr.readline())
        assert f"is locked by process {os.getpid()}" in seen[-1] and "waiting up to 600 s" in seen[-1], seen
    out, err = waiter.communicate(timeout=600)
    assert waiter.returncode == 0 and "1 unchanged" in out, err
