"""The index directory: atomic snapshots, crash safety under SIGKILL, the writer lock, corruption checks."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from llama_index.core.schema import TextNode
from llama_index.core.vector_stores.types import VectorStoreQuery

from ragkit.errors import IndexCorruptError, IndexLockedError, IndexNotFoundError
from ragkit.store import FaissVectorStore, IndexDirectory

DIM = 8


def nodes(n: int, prefix: str, seed: int) -> list[TextNode]:
    rng = np.random.default_rng(seed)
    return [TextNode(id_=f"{prefix}{i}", text=f"{prefix} text {i}", embedding=rng.standard_normal(DIM).tolist())
            for i in range(n)]


def build(path: Path, n: int = 20, prefix: str = "a", extra: bytes | None = None) -> FaissVectorStore:
    store = FaissVectorStore(embedder_name="test-embedder", dimension=DIM)
    store.add(nodes(n, prefix, seed=1))
    store.save(path, extra=None if extra is None else (lambda w: w.write_bytes("ingest.json", extra)))
    return store


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under path (lock files aside) with its sha256: to assert nothing was touched."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".lock")}


def ids_of(store: FaissVectorStore) -> set[str]:
    return {n.node_id for n in store.get_nodes()}


# A writer in a real process: loads the index, adds 30 "b" nodes, saves with an extra artefact.
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from llama_index.core.schema import TextNode
    from ragkit.store import FaissVectorStore, IndexDirectory
    directory = IndexDirectory(sys.argv[1])
    with directory.lock():
        store = FaissVectorStore.load(directory, embedder_name="test-embedder", dimension=8)
        rng = np.random.default_rng(2)
        store.add([TextNode(id_=f"b{i}", text=f"b text {i}", embedding=rng.standard_normal(8).tolist())
                   for i in range(30)])
        store.save(directory, extra=lambda w: w.write_bytes("ingest.json", b'{"v": 2}'))
    print("DONE", flush=True)
""")


def start_writer(index: Path, pause_at: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("RAGKIT_TEST_PAUSE_AT", None)
    if pause_at:
        env["RAGKIT_TEST_PAUSE_AT"] = pause_at
    return subprocess.Popen([sys.executable, "-c", WRITER, str(index)], env=env, stderr=subprocess.PIPE, text=True)


def wait_paused(proc: subprocess.Popen, stage: str) -> None:
    for line in proc.stderr:
        if line.strip() == f"RAGKIT-PAUSED {stage}":
            return
    proc.wait()
    raise AssertionError(f"writer exited with {proc.returncode} before pausing at {stage}")


def test_commit_layout_manifest_and_garbage_collection(tmp_path):
    index = tmp_path / "idx"
    build(index, extra=b'{"v": 1}')
    directory = IndexDirectory(index)
    snap = directory.current()
    assert (index / "CURRENT").read_text() == "v000001\n" and snap.name == "v000001"
    assert set(snap.manifest["files"]) == {"vectors.faiss", "store.json", "nodes.json", "ingest.json"}
    assert snap.manifest["format_version"] == 1 and snap.meta["counts"]["nodes"] == 20
    assert snap.meta["embedder"] == {"name": "test-embedder", "dimension": DIM}
    assert snap.read_bytes("ingest.json") == b'{"v": 1}'
    for i in range(2, 5):
        store = FaissVectorStore.load(index)
        store.add(nodes(1, f"x{i}-", seed=i))
        store.save(index)
    assert directory.snapshots() == ["v000003", "v000004"]  # live + previous; older ones collected
    assert directory.current().name == "v000004" and directory.current().manifest["previous"] == "v000003"
    assert not list(index.glob(".tmp-*"))
    assert FaissVectorStore.load(index).node_count == 23


@pytest.mark.parametrize("stage, survives", [
    ("writing", "old"),        # files half written in the temp dir
    ("before-rename", "old"),  # snapshot complete in the temp dir
    ("before-switch", "old"),  # snapshot renamed into place, CURRENT not yet replaced
    ("before-gc", "new"),      # CURRENT replaced, old snapshots not yet collected
])
def test_sigkill_during_persist_leaves_a_loadable_correct_index(tmp_path, stage, survives):
    index = tmp_path / "idx"
    build(index, extra=b'{"v": 1}')
    before = tree_digest(index / "v000001")
    proc = start_writer(index, pause_at=stage)
    wait_paused(proc, stage)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    directory = IndexDirectory(index)
    store = FaissVectorStore.load(directory, embedder_name="test-embedder", dimension=DIM)
    snap = directory.current()
    if survives == "old":
        assert snap.name == "v000001" and ids_of(store) == {f"a{i}" for i in range(20)}
        assert snap.read_bytes("ingest.json") == b'{"v": 1}'
    else:
        assert snap.name == "v000002" and store.node_count == 50
        assert snap.read_bytes("ingest.json") == b'{"v": 2}'
    assert tree_digest(index / "v000001") == before  # the previous snapshot was never touched
    hit = store.query(VectorStoreQuery(query_embedding=nodes(20, "a", 1)[3].embedding, similarity_top_k=1))
    assert hit.ids == ["a3"] and hit.nodes[0].get_content() == "a text 3"

    # the lock died with the process: the next writer gets it, cleans the leftovers, commits
    store.add(nodes(5, "c", seed=5))
    with directory.lock(timeout=0):
        store.save(directory)
    assert FaissVectorStore.load(index).node_count == store.node_count
    assert not list(index.glob(".tmp-*"))
    assert directory.snapshots() == [snap.name, directory.current_name()]


def test_second_writer_gets_index_locked_error_naming_the_holder(tmp_path):
    index = tmp_path / "idx"
    build(index)
    before = tree_digest(index)
    holder = start_writer(index, pause_at="writing")
    try:
        wait_paused(holder, "writing")
        store = FaissVectorStore.load(index)  # readers are not blocked
        store.add(nodes(2, "c", seed=3))
        with pytest.raises(IndexLockedError, match=rf"locked by process {holder.pid} .*Waited 0.3 s"):
            store.save(IndexDirectory(index, lock_timeout=0.3))
        with pytest.raises(IndexLockedError, match=str(index / ".lock")), IndexDirectory(index).lock(timeout=0):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert {k: v for k, v in tree_digest(index).items() if not k.startswith(".tmp-")} == before


def test_lock_is_reentrant_within_one_writer(tmp_path):
    directory = IndexDirectory(tmp_path / "idx")
    store = FaissVectorStore(embedder_name="test-embedder", dimension=DIM)
    store.add(nodes(3, "a", seed=1))
    with directory.lock():
        store.save(directory)
        store.add(nodes(3, "b", seed=2))
        store.save(directory)
    assert not (tmp_path / "idx" / ".lock.owner").exists()
    assert FaissVectorStore.load(directory).node_count == 6


def corrupt_truncate_faiss(index: Path) -> str:
    f = index / "v000001" / "vectors.faiss"
    f.write_bytes(f.read_bytes()[:100])
    return r"vectors.faiss has 100 bytes but the manifest records \d+"


def corrupt_flip_a_byte(index: Path) -> str:
    f = index / "v000001" / "nodes.json"
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    return "nodes.json fails its sha256 checksum"


def corrupt_garbage_manifest(index: Path) -> str:
    (index / "v000001" / "manifest.json").write_bytes(b"\x00\x13garbage{")
    return "manifest.json is not valid JSON"


def corrupt_missing_target(index: Path) -> str:
    (index / "CURRENT").write_text("v000007\n")
    return r"names snapshot 'v000007' but .*v000007 does not exist"


def corrupt_garbage_current(index: Path) -> str:
    (index / "CURRENT").write_bytes(b"\xff\xfe not a name")
    return "should name a snapshot like 'v000001'"


def corrupt_missing_file(index: Path) -> str:
    (index / "v000001" / "store.json").unlink()
    return "store.json is listed in the manifest but missing"


@pytest.mark.parametrize("corrupt", [corrupt_truncate_faiss, corrupt_flip_a_byte, corrupt_garbage_manifest,
                                     corrupt_missing_target, corrupt_garbage_current, corrupt_missing_file])
def test_corrupt_index_fails_clearly_and_is_not_overwritten(tmp_path, corrupt):
    index = tmp_path / "idx"
    build(index)
    message = corrupt(index)
    damaged = tree_digest(index)
    with pytest.raises(IndexCorruptError, match=message) as err:
        FaissVectorStore.load(index, embedder_name="test-embedder", dimension=DIM)
    assert "--force" in str(err.value)
    other = FaissVectorStore(embedder_name="test-embedder", dimension=DIM)
    other.add(nodes(4, "z", seed=4))
    with pytest.raises(IndexCorruptError, match=message):
        other.save(index)
    assert tree_digest(index) == damaged  # nothing written, nothing removed

    # force=True writes a new live snapshot and keeps the damaged one beside it
    other.save(index, force=True)
    assert ids_of(FaissVectorStore.load(index)) == {f"z{i}" for i in range(4)}
    assert all(tree_digest(index).get(k) == v for k, v in damaged.items() if k != "CURRENT")


def test_truncated_faiss_without_checksums_is_still_corrupt(tmp_path):
    index = tmp_path / "idx"
    build(index)
    corrupt_truncate_faiss(index)
    with pytest.raises(IndexCorruptError, match="cannot be read"):
        FaissVectorStore.load(IndexDirectory(index), verify=False)


def test_missing_index_and_orphan_snapshots(tmp_path):
    with pytest.raises(IndexNotFoundError, match="no index at .*ragkit ingest"):
        FaissVectorStore.load(tmp_path / "nothing")
    # a first write killed after the rename leaves a snapshot without CURRENT: still "no index", kept
    index = tmp_path / "idx"
    build(index)
    (index / "CURRENT").unlink()
    with pytest.raises(IndexNotFoundError, match=r"snapshot directories \['v000001'\] exist without a CURRENT"):
        FaissVectorStore.load(index)
    build(index, prefix="n")
    assert IndexDirectory(index).snapshots() == ["v000001", "v000002"]
    assert ids_of(FaissVectorStore.load(index)) == {f"n{i}" for i in range(20)}


def test_foreign_directory_is_refused_without_force(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    store = FaissVectorStore(embedder_name="test-embedder", dimension=DIM)
    store.add(nodes(2, "a", seed=1))
    with pytest.raises(IndexCorruptError, match=r"not empty and has no CURRENT file .*notes.txt"):
        store.save(tmp_path)
    store.save(tmp_path, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(IndexCorruptError, match="notes.txt exists and is not a directory"):
        store.save(tmp_path / "notes.txt")
    assert FaissVectorStore.load(tmp_path).node_count == 2


def test_manifest_without_store_entries_is_corrupt(tmp_path):
    directory = IndexDirectory(tmp_path / "idx")
    directory.commit(lambda w: w.write_bytes("x.bin", b"123"), meta={"what": "not a store"})
    assert directory.current().read_bytes("x.bin") == b"123"
    with pytest.raises(IndexCorruptError, match="lacks the embedder/index entries"):
        FaissVectorStore.load(directory)
    with pytest.raises(ValueError, match="invalid snapshot file name 'manifest.json'"):
        directory.commit(lambda w: w.write_bytes("manifest.json", b"{}"), meta={})
    assert not list((tmp_path / "idx").glob(".tmp-*"))  # a failed write leaves no temp directory
    assert directory.current_name() == "v000001"


BIG_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from llama_index.core.schema import TextNode
    from ragkit.store import FaissVectorStore
    seed, n = int(sys.argv[2]), 20_000
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, 64)).astype("float32")
    filler = "lorem ipsum dolor sit amet " * 150  # ~4 KB of text per node: ~80 MB of nodes.json
    store = FaissVectorStore(embedder_name="test-embedder", dimension=64)
    store.add([TextNode(id_=f"s{seed}-{i}", text=filler, embedding=vectors[i].tolist()) for i in range(n)])
    print("SAVING", flush=True)
    t0 = time.perf_counter()
    store.save(sys.argv[1])
    print("SAVED", time.perf_counter() - t0, flush=True)
""")


@pytest.mark.slow
def test_sigkill_at_random_points_of_a_large_write(tmp_path):
    """No test hook: kill real writers at random moments of an ~80 MB save; the index always loads whole."""
    index = tmp_path / "idx"
    first = subprocess.run([sys.executable, "-c", BIG_WRITER, str(index), "0"], capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    save_s = float(first.stdout.split("SAVED")[1])
    rng = np.random.default_rng(0)
    for attempt in range(1, 6):
        proc = subprocess.Popen([sys.executable, "-c", BIG_WRITER, str(index), str(attempt)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().strip() == "SAVING"
        time.sleep(rng.uniform(0, save_s))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = FaissVectorStore.load(index, embedder_name="test-embedder", dimension=64)  # verifies checksums
        ids = {n.node_id for n in store.get_nodes(node_ids=[f"s{s}-7" for s in range(attempt + 1)])}
        assert store.node_count == 20_000 and len(ids) == 1  # exactly one complete writer's nodes
        live = IndexDirectory(index).current_name()
        print(f"attempt {attempt}: killed, live snapshot {live}, nodes from {ids}")
