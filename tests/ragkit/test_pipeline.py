"""Pipeline: persistence through the index directory, bad indexes and queries, context assembly, answers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from llama_index.core.schema import NodeWithScore, TextNode

from ragkit.context import ORDERINGS, assemble_context
from ragkit.errors import (
    ContextWindowExceededError,
    EmbedderMismatchError,
    EmptyIndexError,
    IndexCorruptError,
    IndexNotFoundError,
    InvalidQueryError,
)
from ragkit.pipeline import INGEST_DOCSTORE_FILE, Pipeline
from ragkit.store import FaissVectorStore, IndexDirectory

SQLITE = Path(__file__).resolve().parents[2] / "corpora" / "sqlite"


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    """Two real SQLite pages (copied, so tests may change them)."""
    d = tmp_path_factory.mktemp("docs")
    for name in ("lockingv3.txt", "lang_vacuum.txt"):
        shutil.copy(SQLITE / name, d / name)
    return d


@pytest.fixture(scope="module")
def built_index(tmp_path_factory, docs, embedder) -> Path:
    index = tmp_path_factory.mktemp("index") / "ix"
    Pipeline(index, embed_model=embedder).ingest([docs], show_progress=False)
    return index


def _copy_index(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ix"
    shutil.copytree(src, dst)
    return dst


def _snapshot_bytes(index: Path) -> dict[str, bytes]:
    return {str(p.relative_to(index)): p.read_bytes() for p in sorted(index.rglob("*")) if p.is_file()}


# ---- persistence -----------------------------------------------------------------------------------

def test_reopened_index_has_the_chunks_and_the_ingestion_hashes(built_index, docs, embedder, tmp_path):
    index = _copy_index(built_index, tmp_path)
    snap = IndexDirectory(index).current()
    assert snap.has(INGEST_DOCSTORE_FILE), "the docstore hashes live in the same snapshot as the vectors"
    p = Pipeline.load(index, embed_model=embedder)
    info = p.info()
    assert info["chunks"] > 10 and info["sources"] == 2 and info["embedder"] == embedder.model_name
    again = p.ingest([docs], show_progress=False)
    assert again.chunks_embedded == 0 and len(again.unchanged) == 2
    assert IndexDirectory(index).current_name() == snap.name, "an ingest that changes nothing commits nothing"


def test_retrieve_finds_the_right_document_and_filters(built_index, embedder):
    p = Pipeline.load(built_index, embed_model=embedder)
    hits = p.retrieve("What is a hot journal?", top_k=3)
    assert len(hits) == 3 and hits[0].node.metadata["file_name"] == "lockingv3.txt"
    assert hits[0].score >= hits[1].score >= hits[2].score
    assert "hot journal" in hits[0].node.get_content().lower()
    only = p.retrieve("What is a hot journal?", top_k=3, filters={"file_name": "lang_vacuum.txt"})
    assert only and {h.node.metadata["file_name"] for h in only} == {"lang_vacuum.txt"}


def test_delete_by_path_is_persisted(built_index, docs, embedder, tmp_path):
    index = _copy_index(built_index, tmp_path)
    p = Pipeline.load(index, embed_model=embedder)
    before = p.info()["chunks"]
    deleted = p.delete(str(docs / "lang_vacuum.txt"))
    assert deleted == [str(docs / "lang_vacuum.txt")]
    reopened = Pipeline.load(index, embed_model=embedder)
    assert 0 < reopened.info()["chunks"] < before
    assert str(docs / "lang_vacuum.txt") not in reopened.info()["files"]


# ---- bad indexes and queries -----------------------------------------------------------------------

def test_corrupt_index_dir_fails_clearly_and_is_not_overwritten(built_index, docs, embedder, tmp_path):
    index = _copy_index(built_index, tmp_path)
    vectors = IndexDirectory(index).current().path / "vectors.faiss"
    vectors.write_bytes(vectors.read_bytes()[:100])
    damaged = _snapshot_bytes(index)
    with pytest.raises(IndexCorruptError, match="vectors.faiss"):
        Pipeline(index, embed_model=embedder)
    assert _snapshot_bytes(index) == damaged, "a failed open must not touch the damaged index"
    p = Pipeline(index, embed_model=embedder, force=True)  # --force: rebuild in place
    p.ingest([docs / "lockingv3.txt"], show_progress=False)
    assert Pipeline.load(index, embed_model=embedder).info()["sources"] == 1


def test_index_built_with_another_embedder_is_refused(tmp_path, embedder):
    index = tmp_path / "ix"
    FaissVectorStore(embedder_name="other-org/other-embedder", dimension=384).save(index)
    before = _snapshot_bytes(index)
    with pytest.raises(EmbedderMismatchError, match="other-org/other-embedder"):
        Pipeline(index, embed_model=embedder)
    assert _snapshot_bytes(index) == before


def test_missing_index_and_foreign_directory(tmp_path, embedder):
    with pytest.raises(IndexNotFoundError, match="ragkit ingest"):
        Pipeline.load(tmp_path / "nothing-here", embed_model=embedder)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(IndexCorruptError, match="not a usable ragkit index"):
        Pipeline(foreign, embed_model=embedder)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_query_on_empty_index_and_top_k_zero(tmp_path, embedder, built_index):
    empty = Pipeline(tmp_path / "empty", embed_model=embedder)
    with pytest.raises(EmptyIndexError, match="empty: nothing to search"):
        empty.retrieve("anything")
    with pytest.raises(EmptyIndexError):
        empty.query("anything")  # fails before any LLM is loaded
    p = Pipeline.load(built_index, embed_model=embedder)
    with pytest.raises(InvalidQueryError, match="top_k must be a positive integer, got 0"):
        p.retrieve("journal", top_k=0)
    with pytest.raises(InvalidQueryError, match="top_k"):
        Pipeline(tmp_path / "x", embed_model=embedder, top_k=0)
    with pytest.raises(InvalidQueryError, match="empty"):
        p.retrieve("   ")


def test_failed_ingest_keeps_the_index_as_it_was(built_index, docs, embedder, tmp_path):
    index = _copy_index(built_index, tmp_path)
    before = _snapshot_bytes(index)
    p = Pipeline.load(index, embed_model=embedder)
    with pytest.raises(Exception, match="no such file"):
        p.ingest([docs, tmp_path / "missing.txt"], show_progress=False)
    assert _snapshot_bytes(index) == before
    assert p.info()["sources"] == 2


# ---- context assembly ------------------------------------------------------------------------------

def _ranked(n: int) -> list[NodeWithScore]:
    return [
        NodeWithScore(node=TextNode(id_=f"n{i}", text=f"Sentence number {i} about journals. " * 8,
                                    metadata={"file_path": f"/d/{'ab'[i % 2]}.txt", "file_name": f"{'ab'[i % 2]}.txt",
                                              "part": 0, "chunk_index": i, "char_start": 100 * i}),
                      score=1.0 - i / 10)
        for i in range(n)
    ]


def test_orderings():
    nodes = _ranked(5)
    ids = {name: [n.node.node_id for n in fn(nodes[::-1])] for name, fn in ORDERINGS.items()}
    assert set(ORDERINGS) == {"score", "reverse", "long_context_reorder", "document"}
    assert ids["score"] == ["n0", "n1", "n2", "n3", "n4"]
    assert ids["reverse"] == ["n4", "n3", "n2", "n1", "n0"]
    assert ids["long_context_reorder"] == ["n0", "n2", "n4", "n3", "n1"]  # best at both ends
    assert ids["document"] == ["n0", "n2", "n4", "n1", "n3"]  # a.txt in file order, then b.txt


@pytest.mark.parametrize("n", range(1, 13))
def test_long_context_reorder_is_llamaindex_for_every_count(n):
    """The name promises LlamaIndex's postprocessor: the same order for 1..12 chunks (even counts included),
    whatever order the chunks arrive in."""
    from llama_index.core.postprocessor import LongContextReorder

    nodes = _ranked(n)
    for given in (nodes, nodes[::-1], nodes[1::2] + nodes[0::2]):
        ours = [x.node.node_id for x in ORDERINGS["long_context_reorder"](given)]
        assert ours == [x.node.node_id for x in LongContextReorder().postprocess_nodes(list(given))]
    if n == 4:
        assert ours == ["n1", "n3", "n2", "n0"]  # best last, second best first (ragkit's mirror was n0 n2 n3 n1)


@pytest.fixture(scope="module")
def llm():
    from ragkit.llm import LocalLLM

    return LocalLLM("default", max_new_tokens=48)


def test_context_fits_window_by_dropping_lowest_ranked_whole_chunks(llm):
    nodes = _ranked(8)
    full = assemble_context(nodes, "What is a journal?", counter=llm, context_window=100_000, reserve_tokens=64)
    assert len(full.nodes) == 8 and not full.dropped
    window = full.prompt_tokens // 2 + 64
    ctx = assemble_context(nodes, "What is a journal?", counter=llm, context_window=window, reserve_tokens=64,
                           ordering="reverse")
    assert 0 < len(ctx.nodes) < 8
    assert ctx.prompt_tokens == llm.count_tokens(ctx.messages) <= window - 64
    kept = {n.node.node_id for n in ctx.nodes}
    assert kept == {f"n{i}" for i in range(len(kept))}, "the best chunks are kept, the worst dropped"
    assert [n.node.node_id for n in ctx.dropped] == [f"n{i}" for i in range(len(kept), 8)]
    for n in ctx.nodes:
        assert n.node.get_content().strip() in ctx.prompt, "chunks are never cut"
    assert [n.node.node_id for n in ctx.nodes] == sorted(kept, reverse=True)  # 'reverse': best last
    with pytest.raises(ContextWindowExceededError):
        assemble_context(nodes, "Why? " * 200, counter=llm, context_window=200, reserve_tokens=64)


def test_query_answers_with_sources_and_token_counts(built_index, embedder, llm):
    p = Pipeline.load(built_index, embed_model=embedder, llm=llm, top_k=3)
    answer = p.query("What is a hot journal in SQLite?")
    assert answer.text
    assert answer.sources[0].file.endswith("lockingv3.txt") and answer.sources[0].score > 0.4
    assert answer.prompt_tokens > 100 and 0 < answer.completion_tokens <= 48
    assert answer.prompt_tokens + 48 <= llm.context_window
