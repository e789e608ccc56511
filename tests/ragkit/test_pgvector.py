"""Pipeline on a real Postgres + pgvector server: sync, deletes, filters, embedder check, bad URLs, kills."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("llama_index.vector_stores.postgres")

from llama_index.core.vector_stores import SimpleVectorStore  # noqa: E402

from ragkit.errors import EmbedderMismatchError, EmptyIndexError, InvalidSettingError, RagkitError  # noqa: E402
from ragkit.pipeline import Pipeline  # noqa: E402
from ragkit.store.pgvector import StoreUnavailableError, open_pg_store  # noqa: E402

SQLITE = Path(__file__).resolve().parents[2] / "corpora" / "sqlite"
_tables = itertools.count()


@pytest.fixture
def store_url(pg_url) -> str:
    """A fresh table on the session's server for each test."""
    return f"{pg_url}?table=t{os.getpid()}_{next(_tables)}"


@pytest.fixture
def docs(tmp_path) -> Path:
    for name in ("lockingv3.txt", "lang_vacuum.txt", "atomiccommit.txt"):
        shutil.copy(SQLITE / name, tmp_path / name)
    return tmp_path


def _ids(nodes) -> list[str]:
    return [n.node.node_id for n in nodes]


def test_ranks_equal_faiss_flat_and_filters_work(store_url, docs, embedder, tmp_path_factory):
    pg = Pipeline(vector_store=store_url, embed_model=embedder)
    faiss = Pipeline(tmp_path_factory.mktemp("ix") / "ix", embed_model=embedder)
    for p in (pg, faiss):
        p.ingest([docs], show_progress=False)
    assert pg.info()["chunks"] == faiss.info()["chunks"] > 10
    for q in ("What is a hot journal?", "How does VACUUM rebuild the database file?", "RESERVED lock"):
        a, b = pg.retrieve(q, top_k=10), faiss.retrieve(q, top_k=10)
        assert _ids(a) == _ids(b)
        assert [n.score for n in a] == pytest.approx([n.score for n in b], abs=1e-5)  # cosine both sides
    vacuum = str(docs / "lang_vacuum.txt")
    hits = pg.retrieve("lock", top_k=5, filters={"file_path": vacuum})
    assert hits and all(n.node.metadata["file_path"] == vacuum for n in hits)
    hits = pg.retrieve("lock", top_k=50, filters={"file_path": [vacuum, str(docs / "lockingv3.txt")]})
    assert {n.node.metadata["file_path"] for n in hits} == {vacuum, str(docs / "lockingv3.txt")}


def test_reingest_is_a_sync_across_processes_and_delete_by_file(store_url, docs, embedder):
    first = Pipeline(vector_store=store_url, embed_model=embedder)
    s = first.ingest([docs], show_progress=False)
    assert len(s.added) == 3
    n_before = first.info()["chunks"]
    again = Pipeline(vector_store=store_url, embed_model=embedder)  # a new pipeline reads the state from the server
    s = again.ingest([docs], show_progress=False)
    assert s.chunks_embedded == 0 and len(s.unchanged) == 3
    assert again.info()["chunks"] == n_before
    (docs / "lang_vacuum.txt").write_text("The quokka is a small marsupial that lives on Rottnest Island.\n")
    s = again.ingest([docs], show_progress=False)
    assert s.updated == [str(docs / "lang_vacuum.txt")]
    top = first.retrieve("Which animal lives on Rottnest Island?", top_k=1)[0]  # first sees again's commit
    assert "quokka" in top.node.get_content()
    assert not [n for n in first.retrieve("VACUUM", top_k=50) if "VACUUM INTO" in n.node.get_content()]
    first.delete(docs / "lockingv3.txt")
    files = {n.node.metadata["file_path"] for n in again.retrieve("lock", top_k=100)}
    assert str(docs / "lockingv3.txt") not in files and len(files) == 2
    assert str(docs / "lockingv3.txt") not in again.info()["files"]


def test_empty_store_and_non_text_store_are_refused(store_url, embedder):
    with pytest.raises(EmptyIndexError, match="empty"):
        Pipeline(vector_store=store_url, embed_model=embedder).retrieve("anything")
    with pytest.raises(RagkitError, match="does not store the node text"):
        Pipeline(vector_store=SimpleVectorStore(), embed_model=embedder)


def test_embedder_is_the_same_by_content_fingerprint_not_name(store_url, docs, embedder):
    renamed = open_pg_store(store_url, {**embedder.identity, "name": "a-copy-elsewhere"}, embedder.dimension)
    Pipeline(vector_store=renamed, embed_model=embedder).ingest([docs / "lockingv3.txt"], show_progress=False)
    assert Pipeline(vector_store=store_url, embed_model=embedder).info()["files"] == [str(docs / "lockingv3.txt")]
    other = {**embedder.identity, "fingerprint": "0" * 64}
    with pytest.raises(EmbedderMismatchError, match="a-copy-elsewhere"):
        open_pg_store(store_url, other, embedder.dimension).load_state()


def test_another_chunk_size_is_refused_and_force_replaces_the_rows(store_url, docs, embedder):
    Pipeline(vector_store=store_url, embed_model=embedder, chunk_tokens=128).ingest([docs / "lockingv3.txt"],
                                                                                    show_progress=False)
    with pytest.raises(InvalidSettingError, match="128-token chunks"):
        Pipeline(vector_store=store_url, embed_model=embedder, chunk_tokens=64)
    forced = Pipeline(vector_store=store_url, embed_model=embedder, chunk_tokens=64, force=True)
    forced.ingest([docs / "lang_vacuum.txt"], show_progress=False)
    again = Pipeline(vector_store=store_url, embed_model=embedder)
    assert again.chunk_tokens == 64 and again.info()["files"] == [str(docs / "lang_vacuum.txt")]
    files = {n.node.metadata["file_path"] for n in again.retrieve("hot journal", top_k=100)}
    assert files == {str(docs / "lang_vacuum.txt")}  # the 128-token rows were replaced, not mixed in


def test_table_of_another_embedder_is_refused_and_untouched(store_url, docs, embedder):
    other = open_pg_store(store_url, {"name": "some-other-embedder"}, embedder.dimension)
    p = Pipeline(vector_store=other, embed_model=embedder)  # written through the store with another identity
    p.ingest([docs / "lockingv3.txt"], show_progress=False)
    count = other.node_count
    with pytest.raises(EmbedderMismatchError, match="some-other-embedder"):
        Pipeline(vector_store=store_url, embed_model=embedder)
    assert other.node_count == count


def test_table_not_made_by_ragkit_is_refused(pg_url, embedder):
    from llama_index.core.schema import TextNode
    from llama_index.vector_stores.postgres import PGVectorStore

    url = f"{pg_url}?table=foreign{os.getpid()}"
    conn = url.split("?")[0].replace("postgresql://", "postgresql+psycopg2://")
    foreign = PGVectorStore(connection_string=conn, async_connection_string=conn.replace("psycopg2", "asyncpg"),
                            table_name=f"foreign{os.getpid()}", embed_dim=embedder.dimension)
    foreign.add([TextNode(text="hello", embedding=[0.1] * embedder.dimension)])
    with pytest.raises(EmbedderMismatchError, match="not created by ragkit"):
        Pipeline(vector_store=url, embed_model=embedder)


@pytest.mark.parametrize("url", ["postgresql://postgres@127.0.0.1:1/postgres",
                                 "postgresql://postgres@127.0.0.1:{port}/no_such_database"])
def test_server_down_or_wrong_url_fails_fast_and_clearly(url, pg_url, embedder):
    url = url.format(port=pg_url.rsplit(":", 1)[1].split("/")[0])
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="cannot reach the vector store at .*Check that the Postgres"):
        Pipeline(vector_store=url, embed_model=embedder)
    assert time.monotonic() - started < 5


def test_bad_table_name_is_refused(pg_url, embedder):
    with pytest.raises(RagkitError, match="table"):
        Pipeline(vector_store=f"{pg_url}?table=Drop;Table", embed_model=embedder)


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from llama_index.core.schema import Document
    from ragkit.pipeline import Pipeline
    docs = [Document(id_=f"doc{i}", text=f"{sys.argv[2]} document {i}. " * 40) for i in range(int(sys.argv[3]))]
    Pipeline(vector_store=sys.argv[1]).ingest(docs, show_progress=False)
""")


def test_kill_during_ingest_leaves_the_old_set(store_url, pg_url, docs, embedder, tmp_path_factory):
    """SIGKILL the writer after its new rows are inserted, while its state-row update waits on our row lock."""
    import sqlalchemy as sa

    p = Pipeline(vector_store=store_url, embed_model=embedder)
    p.ingest([docs], show_progress=False)
    before = sorted(_ids(p.retrieve("lock", top_k=1000)))
    script = tmp_path_factory.mktemp("script") / "ingest.py"
    script.write_text(KILL_SCRIPT)
    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg2://"))
    table = p.vector_store.vectors_table
    with engine.connect() as holder, engine.connect() as watcher:
        holder.execute(sa.text("SELECT 1 FROM ragkit_stores WHERE vectors_table = :t FOR UPDATE"), {"t": table})
        proc = subprocess.Popen([sys.executable, str(script), store_url, "new", "30"], env=os.environ.copy())
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                waiting = watcher.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query ILIKE 'INSERT INTO ragkit_stores%'")).scalar()
                watcher.commit()
                if waiting:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the writer ended before reaching its commit"
            inserted = watcher.execute(sa.text(  # the writer's rows exist, uncommitted, in its transaction
                f"SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = '{table}'")).scalar()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            proc.kill()
            proc.wait()
        holder.rollback()
    assert inserted is not None
    time.sleep(0.5)  # the server sees the dropped connection and rolls the writer's transaction back
    after = Pipeline(vector_store=store_url, embed_model=embedder)
    assert sorted(_ids(after.retrieve("lock", top_k=1000))) == before
    assert sorted(after.info()["files"]) == sorted(str(f) for f in docs.iterdir())
    assert subprocess.run([sys.executable, str(script), store_url, "new", "30"], env=os.environ.copy()).returncode == 0
    assert after.info()["chunks"] == len(before) + 30  # the new set, whole


def test_cli_ingest_retrieve_delete_on_store_and_bad_url(store_url, docs):
    from tests.ragkit.test_cli import ragkit

    out = ragkit("ingest", str(docs), "--store", store_url, "-q").stdout
    assert "3 added" in out and "chunks from 3 files" in out
    assert "0 chunks embedded" in ragkit("ingest", str(docs), "--store", store_url, "-q").stdout
    out = ragkit("retrieve", "What is a hot journal?", "--store", store_url, "--top-k", "2").stdout
    assert out.startswith("[1] score ") and "[2] score " in out
    out = ragkit("delete", str(docs / "lockingv3.txt"), "--store", store_url).stdout
    assert "deleted 1 document(s)" in out
    assert str(docs / "lockingv3.txt") not in ragkit("info", "--store", store_url, "--files").stdout
    started = time.monotonic()
    proc = ragkit("retrieve", "x", "--store", "postgresql://postgres@127.0.0.1:1/postgres", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and "cannot reach the vector store at postgresql://postgres@127.0.0.1:1/postgres" in errors[0]
    assert time.monotonic() - started < 30  # includes the command's start (torch, MiniLM)
