"""FaissVectorStore on real FAISS: add/query/upsert/delete/filters for every index kind, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
)

from ragkit.errors import EmbedderMismatchError, InvalidQueryError
from ragkit.store import FaissVectorStore

DIM = 16
KINDS = ["flat", "hnsw", "ivf"]


def make_nodes(n: int, seed: int = 0, prefix: str = "n", docs: int = 10) -> list[TextNode]:
    rng = np.random.default_rng(seed)
    nodes = []
    for i in range(n):
        node = TextNode(id_=f"{prefix}{i}", text=f"text of {prefix}{i}", embedding=rng.standard_normal(DIM).tolist(),
                        metadata={"doc": f"d{i % docs}", "group": i % 3, "lang": "en" if i % 2 else "fr"})
        node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=f"d{i % docs}")
        nodes.append(node)
    return nodes


def cosine_top(nodes: list[TextNode], q: list[float], k: int, keep=lambda n: True) -> list[str]:
    kept = [n for n in nodes if keep(n)]
    m = np.array([n.embedding for n in kept])
    s = (m / np.linalg.norm(m, axis=1, keepdims=True)) @ (np.array(q) / np.linalg.norm(q))
    return [kept[i].node_id for i in np.argsort(-s)[:k]]


def q(embedding, k: int = 5, **kw) -> VectorStoreQuery:
    return VectorStoreQuery(query_embedding=list(embedding), similarity_top_k=k, **kw)


def eq(key, value) -> MetadataFilter:
    return MetadataFilter(key=key, value=value, operator=FilterOperator.EQ)


@pytest.fixture(params=KINDS)
def store(request) -> FaissVectorStore:
    return FaissVectorStore(embedder_name="test-embedder", dimension=DIM, kind=request.param, ivf_nprobe=64)


def test_query_returns_full_nodes_with_cosine_scores(store):
    nodes = make_nodes(300)
    store.add(nodes)
    target = nodes[42]
    # a scaled query vector: cosine is scale-invariant, so the node itself scores 1.0
    res = store.query(q(np.array(target.embedding) * 7.5, k=5))
    assert res.ids[0] == target.node_id
    assert res.similarities[0] == pytest.approx(1.0, abs=1e-5)
    assert res.nodes[0].get_content() == "text of n42" and res.nodes[0].metadata["doc"] == "d2"
    assert res.nodes[0].embedding is None  # the docstore keeps text, not vectors
    assert res.similarities == sorted(res.similarities, reverse=True)
    exact = cosine_top(nodes, target.embedding, 5)
    assert res.ids == exact or store.kind != "flat"
    for node_id, sim in zip(res.ids, res.similarities):
        e = np.array(next(n.embedding for n in nodes if n.node_id == node_id))
        t = np.array(target.embedding)
        assert sim == pytest.approx(float(e @ t / np.linalg.norm(e) / np.linalg.norm(t)), abs=1e-4)


def test_upsert_replaces_text_and_vector(store):
    nodes = make_nodes(100)
    store.add(nodes)
    new_vec = np.random.default_rng(9).standard_normal(DIM).tolist()
    store.add([TextNode(id_="n5", text="rewritten", embedding=new_vec, metadata={"doc": "d5", "group": 9})])
    assert store.node_count == 100
    res = store.query(q(new_vec, k=1))
    assert res.ids == ["n5"] and res.nodes[0].text == "rewritten"
    old = store.query(q(nodes[5].embedding, k=3))
    assert "n5" not in old.ids or old.similarities[old.ids.index("n5")] < 0.99
    # the old metadata no longer matches, the new does
    assert store.query(q(new_vec, k=5, filters=MetadataFilters(filters=[eq("group", 2)]))).ids.count("n5") == 0
    assert store.query(q(new_vec, k=5, filters=MetadataFilters(filters=[eq("group", 9)]))).ids == ["n5"]


def test_delete_by_document_and_by_node(store):
    nodes = make_nodes(200)
    store.add(nodes)
    store.delete("d3")  # nodes 3, 13, 23, ...
    gone = {n.node_id for n in nodes if n.ref_doc_id == "d3"}
    assert store.node_count == 180 and "d3" not in store.ref_doc_ids()
    for n in nodes:
        if n.node_id in gone:
            assert not gone & set(store.query(q(n.embedding, k=10)).ids)
    store.delete_nodes(["n0", "n1", "missing-id"])
    assert store.node_count == 178
    assert not {"n0", "n1"} & set(store.query(q(nodes[0].embedding, k=20)).ids)
    store.delete_nodes(filters=MetadataFilters(filters=[eq("lang", "fr")]))
    assert all(n.metadata["lang"] == "en" for n in store.get_nodes())
    store.delete("no-such-doc")  # deleting an unknown document is a no-op
    with pytest.raises(InvalidQueryError, match="node_ids or filters"):
        store.delete_nodes()


def test_filters_return_k_matches_and_only_matches(store):
    nodes = make_nodes(800)
    store.add(nodes)
    qv = np.random.default_rng(5).standard_normal(DIM).tolist()
    cases = [
        (MetadataFilters(filters=[eq("doc", "d7")]), lambda n: n.metadata["doc"] == "d7"),  # 80 matches
        (MetadataFilters(filters=[MetadataFilter(key="doc", value=["d1", "d2"], operator=FilterOperator.IN)]),
         lambda n: n.metadata["doc"] in ("d1", "d2")),
        (MetadataFilters(filters=[eq("group", 1), eq("lang", "en")]),
         lambda n: n.metadata["group"] == 1 and n.metadata["lang"] == "en"),
        (MetadataFilters(filters=[eq("doc", "d1"), eq("doc", "d4")], condition=FilterCondition.OR),
         lambda n: n.metadata["doc"] in ("d1", "d4")),
        (MetadataFilters(filters=[eq("lang", "en"), MetadataFilters(
            filters=[eq("group", 0), eq("group", 2)], condition=FilterCondition.OR)]),
         lambda n: n.metadata["lang"] == "en" and n.metadata["group"] in (0, 2)),
    ]
    for filters, keep in cases:
        res = store.query(q(qv, k=10, filters=filters))
        assert len(res.ids) == 10
        assert all(keep(n) for n in res.nodes)
        exact = cosine_top(nodes, qv, 10, keep)
        overlap = len(set(res.ids) & set(exact)) / 10
        assert overlap == 1.0 if store.kind == "flat" else overlap >= 0.8


@pytest.mark.parametrize("exact_filter_below", [2048, 0], ids=["exact-small-filters", "ann-then-fallback"])
def test_selective_filter_returns_every_match(store, exact_filter_below):
    """A filter matching 7 of 1000 nodes: approximate indexes must still return all 7, best first.

    With exact_filter_below=0 the HNSW/IVF search runs with the IDSelector first and, finding too few
    hits, falls back to exact scoring of the matches.
    """
    store.exact_filter_below = exact_filter_below
    nodes = make_nodes(1000)
    for n in nodes[:7]:
        n.metadata["rare"] = "yes"
    store.add(nodes)
    qv = nodes[800].embedding
    res = store.query(q(qv, k=10, filters=MetadataFilters(filters=[eq("rare", "yes")])))
    assert sorted(res.ids) == sorted(f"n{i}" for i in range(7))
    assert res.ids == cosine_top(nodes[:7], qv, 10)
    # doc_ids and node_ids restrict the same way
    assert set(store.query(q(qv, k=1000, doc_ids=["d1"])).ids) == {f"n{i}" for i in range(1, 1000, 10)}
    assert store.query(q(qv, k=50, node_ids=["n3", "n9"])).ids in (["n3", "n9"], ["n9", "n3"])


def test_filter_without_matches_and_bad_filters(store):
    store.add(make_nodes(50))
    qv = [1.0] * DIM
    assert store.query(q(qv, filters=MetadataFilters(filters=[eq("doc", "nope")]))).ids == []
    with pytest.raises(InvalidQueryError, match="'>'.*use '==' \\(EQ\\) or 'in'"):
        store.query(q(qv, filters=MetadataFilters(filters=[
            MetadataFilter(key="group", value=1, operator=FilterOperator.GT)])))
    with pytest.raises(InvalidQueryError, match="needs a list"):
        store.query(q(qv, filters=MetadataFilters(filters=[
            MetadataFilter(key="group", value=1, operator=FilterOperator.IN)])))


def test_empty_index_and_top_k_zero(store):
    res = store.query(q([1.0] * DIM, k=3))
    assert res.ids == [] and res.nodes == [] and res.similarities == []
    for bad in (0, -1):
        with pytest.raises(InvalidQueryError, match=f"top_k must be a positive integer, got {bad}"):
            store.query(q([1.0] * DIM, k=bad))
    store.add(make_nodes(20))
    with pytest.raises(InvalidQueryError, match="got 0"):
        store.query(q([1.0] * DIM, k=0))
    assert len(store.query(q([1.0] * DIM, k=100)).ids) == 20  # k above the count returns everything


def test_wrong_dimension_is_refused_and_nothing_changes(store):
    store.add(make_nodes(30))
    before = store.query(q([1.0] * DIM, k=30)).ids
    bad = TextNode(id_="bad", text="x", embedding=[0.1] * (DIM + 1))
    with pytest.raises(EmbedderMismatchError, match=r"node 'bad'.s embedding has dimension 17.*'test-embedder' with dimension 16"):
        store.add([*make_nodes(3, seed=1, prefix="ok"), bad])
    with pytest.raises(EmbedderMismatchError, match="the query embedding has dimension 8"):
        store.query(q([1.0] * 8))
    with pytest.raises(InvalidQueryError, match="has no embedding"):
        store.add([TextNode(id_="noemb", text="x")])
    assert store.node_count == 30 and store.query(q([1.0] * DIM, k=30)).ids == before


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_tombstones_compact_and_keep_results_exact(kind):
    store = FaissVectorStore(embedder_name="e", dimension=DIM, kind=kind, ivf_nprobe=64, compact_ratio=0.3)
    nodes = make_nodes(1000)
    store.add(nodes)
    store.delete_nodes([f"n{i}" for i in range(200)])
    assert store.num_tombstones == 200 and store.client.ntotal == 1000
    store.delete_nodes([f"n{i}" for i in range(200, 400)])  # 40% > 30%: rebuilt
    assert store.num_tombstones == 0 and store.client.ntotal == 600 and store.node_count == 600
    live = nodes[400:]
    for n in live[:20]:
        res = store.query(q(n.embedding, k=5))
        assert res.ids[0] == n.node_id
        assert len(set(res.ids) & set(cosine_top(live, n.embedding, 5))) >= 4


def test_ivf_trains_on_first_batch_or_on_demand():
    store = FaissVectorStore(embedder_name="e", dimension=DIM, kind="ivf")
    assert store.client is None
    nodes = make_nodes(2000)
    store.add(nodes)
    ivf = __import__("faiss").extract_index_ivf(store.client)
    assert ivf.is_trained and ivf.nlist == min(int(4 * np.sqrt(2000)), 2000 // 39)
    other = FaissVectorStore(embedder_name="e", dimension=DIM, kind="ivf", ivf_nlist=8)
    other.train(np.random.default_rng(3).standard_normal((500, DIM)))
    other.add(nodes[:10])
    assert __import__("faiss").extract_index_ivf(other.client).nlist == 8
    with pytest.raises(InvalidQueryError, match="already holds vectors"):
        other.train(np.ones((10, DIM)))
    with pytest.raises(InvalidQueryError, match="kind='ivf'"):
        FaissVectorStore(embedder_name="e", dimension=DIM).train(np.ones((10, DIM)))


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_round_trip(tmp_path, kind):
    store = FaissVectorStore(embedder_name="test-embedder", dimension=DIM, kind=kind, ivf_nprobe=64, hnsw_ef_search=40)
    nodes = make_nodes(500)
    store.add(nodes)
    store.delete("d4")
    queries = [n.embedding for n in nodes[:10]]
    filt = MetadataFilters(filters=[eq("lang", "en")])
    before = [store.query(q(v, k=7)) for v in queries] + [store.query(q(queries[0], k=7, filters=filt))]
    snap = store.save(tmp_path / "idx")
    assert snap.meta["embedder"] == {"name": "test-embedder", "dimension": DIM}
    assert snap.meta["index"]["kind"] == kind and snap.meta["counts"]["nodes"] == 450

    loaded = FaissVectorStore.load(tmp_path / "idx", embedder_name="test-embedder", dimension=DIM)
    assert (loaded.kind, loaded.hnsw_ef_search, loaded.node_count) == (kind, 40, 450)
    after = [loaded.query(q(v, k=7)) for v in queries] + [loaded.query(q(queries[0], k=7, filters=filt))]
    for a, b in zip(before, after):
        assert a.ids == b.ids and a.similarities == pytest.approx(b.similarities)
        assert [n.get_content() for n in a.nodes] == [n.get_content() for n in b.nodes]
    # the loaded store keeps working: upsert, delete, save again
    loaded.add(make_nodes(5, seed=2, prefix="new"))
    loaded.delete("d5")
    loaded.save(tmp_path / "idx")
    again = FaissVectorStore.load(tmp_path / "idx")
    assert again.node_count == 450 + 5 - 50 and "d5" not in again.ref_doc_ids() and "new3" in {
        n.node_id for n in again.get_nodes()}


def test_loading_with_another_embedder_names_both(tmp_path):
    store = FaissVectorStore(embedder_name="all-MiniLM-L6-v2", dimension=DIM)
    store.add(make_nodes(5))
    store.save(tmp_path / "idx")
    with pytest.raises(EmbedderMismatchError, match=r"built with embedder 'all-MiniLM-L6-v2' \(dimension 16\).*"
                                                     r"opened with 'bge-small' \(dimension 16\)"):
        FaissVectorStore.load(tmp_path / "idx", embedder_name="bge-small", dimension=DIM)
    with pytest.raises(EmbedderMismatchError, match="dimension 384"):
        FaissVectorStore.load(tmp_path / "idx", embedder_name="all-MiniLM-L6-v2", dimension=384)
    assert FaissVectorStore.load(tmp_path / "idx", embedder_name="all-MiniLM-L6-v2", dimension=DIM).node_count == 5


def test_llamaindex_retriever_gets_full_nodes_from_the_store():
    """LlamaIndex's own retriever over the store (mechanics only: the query embedding is given directly)."""
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.schema import QueryBundle

    store = FaissVectorStore(embedder_name="e", dimension=DIM)
    nodes = make_nodes(50)
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=store),
                             embed_model=MockEmbedding(embed_dim=DIM))
    assert store.node_count == 50
    hits = index.as_retriever(similarity_top_k=3).retrieve(QueryBundle("ignored", embedding=nodes[8].embedding))
    assert hits[0].node.node_id == "n8" and hits[0].node.get_content() == "text of n8"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[0].score >= hits[1].score


def test_docs_llamaindex_storage_example_round_trips(tmp_path):
    """docs/examples/llamaindex_storage.py, run as documented: StorageContext persist -> reload -> retrieve."""
    import runpy

    root = next(p for p in Path(__file__).resolve().parents if (p / "docs" / "examples").is_dir())
    example = runpy.run_path(str(root / "docs" / "examples" / "llamaindex_storage.py"))
    assert example["main"](tmp_path / "storage") == ["journal"]
    assert (tmp_path / "storage" / "docstore.json").is_file()
