"""The index a team relies on: embedder identity by content, re-ingest as a sync, one chunk size,
readers during commits, ingestion committed in steps (issue 20)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ragkit.embed import SentenceTransformerEmbedding
from ragkit.errors import EmbedderMismatchError, InvalidSettingError, ModelNotFoundError
from ragkit.models import default_embedder_path
from ragkit.pipeline import Pipeline

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "corpora").is_dir())  # the repository, wherever tests/ nests this file
SQLITE = ROOT / "corpora" / "sqlite"
SMALL = ["zeroconf.txt", "lang_createview.txt", "lang_attach.txt", "rowidtable.txt", "threadsafe.txt",
         "serverless.txt", "lang_createindex.txt", "about.txt"]


def _snapshot_bytes(index: Path) -> dict[str, bytes]:
    return {str(p.relative_to(index)): p.read_bytes() for p in sorted(index.rglob("*")) if p.is_file()}


def _model_copy(dst: Path, pooling: str = "mean") -> Path:
    """The embedded MiniLM in ``dst`` (weights linked, configs copied), with mean or CLS pooling."""
    src = default_embedder_path()
    for f in src.rglob("*"):
        if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.suffix == ".safetensors":
                target.symlink_to(f)
            else:
                shutil.copy(f, target)
    cfg_path = dst / "1_Pooling" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pooling_mode_mean_tokens"] = pooling == "mean"
    cfg["pooling_mode_cls_token"] = pooling == "cls"
    cfg_path.write_text(json.dumps(cfg))
    return dst


@pytest.fixture
def docs(tmp_path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    for name in SMALL[:4]:
        shutil.copy(SQLITE / name, d / name)
    return d


# ---- embedder identity --------------------------------------------------------------------------------

def test_same_folder_name_other_pooling_is_refused(tmp_path, docs):
    mean = SentenceTransformerEmbedding(str(_model_copy(tmp_path / "a" / "model", "mean")))
    cls_ = SentenceTransformerEmbedding(str(_model_copy(tmp_path / "b" / "model", "cls")))
    assert mean.model_name == cls_.model_name == "model"
    assert mean.fingerprint != cls_.fingerprint
    index = tmp_path / "ix"
    Pipeline(index, embed_model=mean).ingest([docs], show_progress=False)
    before = _snapshot_bytes(index)
    with pytest.raises(EmbedderMismatchError, match="fingerprint"):
        Pipeline(index, embed_model=cls_).ingest([docs], show_progress=False)
    assert _snapshot_bytes(index) == before


def test_index_remembers_its_embedder_and_says_when_it_is_gone(tmp_path, docs):
    model = _model_copy(tmp_path / "models" / "mini", "mean")
    index = tmp_path / "ix"
    built = Pipeline(index, embed_model=str(model))
    built.ingest([docs], show_progress=False)
    reopened = Pipeline.load(index)  # no embed_model: the index says which one
    assert reopened.embed_model.source == str(model.resolve())
    assert reopened.embed_model.fingerprint == built.embed_model.fingerprint
    assert reopened.retrieve("Is SQLite thread safe?", top_k=1)
    shutil.move(str(model), str(tmp_path / "elsewhere"))
    with pytest.raises(ModelNotFoundError, match=r"built with embedder 'mini' from .*--embed-model"):
        Pipeline.load(index)
    moved = Pipeline.load(index, embed_model=str(tmp_path / "elsewhere"))  # same content, other place: accepted
    assert moved.info()["chunks"] == built.info()["chunks"]


# ---- re-ingest is a sync; one chunk size per index ----------------------------------------------------

def test_reingest_of_a_folder_deletes_files_moved_out_of_it(tmp_path, docs, embedder):
    index = tmp_path / "ix"
    p = Pipeline(index, embed_model=embedder)
    p.ingest([docs], show_progress=False)
    shutil.move(str(docs / SMALL[0]), str(tmp_path / SMALL[0]))
    shutil.move(str(docs / SMALL[1]), str(tmp_path / SMALL[1]))
    summary = Pipeline(index, embed_model=embedder).ingest([docs], show_progress=False)
    assert sorted(summary.removed) == sorted(str(docs.resolve() / n) for n in SMALL[:2])
    assert "2 removed" in str(summary)
    reopened = Pipeline.load(index, embed_model=embedder)
    assert sorted(reopened.ingestor.sources) == sorted(str(docs.resolve() / n) for n in SMALL[2:4])
    files = {n.node.metadata["file_name"] for n in reopened.retrieve("zeroconf view attach", top_k=50)}
    assert files == set(SMALL[2:4])


def test_other_chunk_size_is_refused_not_mixed(tmp_path, docs, embedder):
    index = tmp_path / "ix"
    Pipeline(index, embed_model=embedder, chunk_tokens=128).ingest([docs], show_progress=False)
    before = _snapshot_bytes(index)
    with pytest.raises(InvalidSettingError, match="built with 128-token chunks"):
        Pipeline(index, embed_model=embedder, chunk_tokens=64)
    assert _snapshot_bytes(index) == before
    assert Pipeline(index, embed_model=embedder).chunk_tokens == 128  # unset keeps the index's size
    assert Pipeline(index, embed_model=embedder, chunk_tokens=64, force=True).chunk_tokens == 64


@pytest.mark.parametrize("bad", [5, -5, 0, 100000])
def test_chunk_size_out_of_range_is_refused(tmp_path, embedder, bad):
    with pytest.raises(InvalidSettingError, match=rf"chunk size \(--chunk-tokens\) {bad} is out of range.*256"):
        Pipeline(tmp_path / "ix", embed_model=embedder, chunk_tokens=bad)
    assert not (tmp_path / "ix").exists()


# ---- readers during commits ---------------------------------------------------------------------------

_WRITER = """
import sys, time, numpy as np
from llama_index.core.schema import TextNode
from ragkit.store import FaissVectorStore
index, commits = sys.argv[1], int(sys.argv[2])
store = FaissVectorStore.load(index)
rng = np.random.default_rng(int(sys.argv[3]))
from ragkit.store import IndexDirectory
d = IndexDirectory(index, lock_timeout=60)
for i in range(commits):
    with d.lock():
        store = FaissVectorStore.load(index)
        n = store.node_count
        vec = rng.standard_normal(8).astype("float32"); vec /= np.linalg.norm(vec)
        store.add([TextNode(id_=f"n{n}", text=f"node {n}", embedding=vec.tolist())])
        store.save(d)
"""

_READER = """
import sys, time
from ragkit.store import FaissVectorStore
index, seconds = sys.argv[1], float(sys.argv[2])
reads, end = 0, time.time() + seconds
while time.time() < end:
    store = FaissVectorStore.load(index)
    n = store.node_count
    got = sorted(int(x.node_id[1:]) for x in store.get_nodes())
    assert got == list(range(n)), (n, got)  # a committed snapshot: nodes n0..n(N-1), nothing partial
    reads += 1
print(reads)
"""


def test_readers_never_see_a_false_corrupt_index_while_writers_commit(tmp_path):
    from ragkit.store import FaissVectorStore

    index = tmp_path / "ix"
    FaissVectorStore(embedder_name="test-vectors", dimension=8).save(index)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(index), "150", str(seed)], env=env,
                                stderr=subprocess.PIPE, text=True) for seed in range(2)]
    readers = [subprocess.Popen([sys.executable, "-c", _READER, str(index), "25"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    reads = 0
    for r in readers:
        out, err = r.communicate(timeout=300)
        assert r.returncode == 0, err
        reads += int(out)
    for w in writers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    assert reads >= 1000
    assert FaissVectorStore.load(index).node_count == 300


# ---- ingestion commits in steps -----------------------------------------------------------------------

_INGEST = """
import sys
from ragkit.pipeline import Pipeline
Pipeline(sys.argv[1], commit_seconds=0).ingest([sys.argv[2]], show_progress=False)
"""


def test_killed_ingest_keeps_the_files_committed_so_far(tmp_path, embedder):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in SMALL:
        shutil.copy(SQLITE / name, docs / name)
    index = tmp_path / "ix"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", _INGEST, str(index), str(docs)], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        current = index / "CURRENT"
        if current.is_file() and int(current.read_text().strip()[1:]) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"ingest finished before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = Pipeline.load(index, embed_model=embedder)
    committed = len(kept.ingestor.sources)
    assert 3 <= committed < len(SMALL)
    resumed = kept.ingest([docs], show_progress=False)
    assert len(resumed.unchanged) == committed and len(resumed.added) == len(SMALL) - committed
    clean = Pipeline(tmp_path / "clean", embed_model=embedder)
    clean.ingest([docs], show_progress=False)
    assert kept.info()["chunks"] == clean.info()["chunks"]
    assert {n.node_id for n in kept.vector_store.get_nodes()} == {n.node_id for n in clean.vector_store.get_nodes()}
