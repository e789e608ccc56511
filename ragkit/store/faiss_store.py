"""FaissVectorStore: a LlamaIndex vector store over FAISS with text, ids, upsert, delete and filters.

Vectors live in ``faiss.IndexIDMap2`` (inner product over L2-normalised float32, so scores are
cosine similarities); nodes (text, metadata, relationships; no embedding) live in a LlamaIndex
``SimpleKVStore`` beside it, serialised as LlamaIndex's docstores do, so ``query`` returns full nodes.
(``SimpleDocumentStore`` itself re-serialises a document's whole node list on every insert, which is
quadratic in the chunks per document.) Each node id maps to a fresh int64 FAISS id on every (re-)add.

Deletion: the flat index removes vectors at once. HNSW graphs cannot remove vectors and
``IndexIDMap2.remove_ids`` is wrong for IVF (it assumes the sub-index renumbers like a flat index), so
those kinds mark deleted ids as tombstones, exclude them with an ``IDSelector`` at query time, and
rebuild the index from the live vectors (:meth:`FaissVectorStore.compact`) once tombstones pass
``compact_ratio`` of it.

Filters (EQ, IN, AND/OR of them) are resolved to the set of matching FAISS ids through an inverted
index of scalar metadata, then searched with an ``IDSelectorBatch``; when an approximate index returns
fewer than ``min(top_k, matches)`` hits (selective filters), the matches are scored exactly instead.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode
from llama_index.core.storage.docstore.utils import doc_to_json, json_to_doc
from llama_index.core.storage.kvstore import SimpleKVStore
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
    VectorStoreQueryResult,
)

from ragkit.errors import EmbedderMismatchError, IndexCorruptError, InvalidArgumentError, InvalidQueryError
from ragkit.store.index_dir import IndexDirectory, Snapshot, SnapshotWriter

IndexKind = Literal["flat", "hnsw", "ivf"]
FAISS_FILE = "vectors.faiss"
STATE_FILE = "store.json"
NODES_FILE = "nodes.json"
STORE_FORMAT = 1


def build_faiss_index(kind: IndexKind, dimension: int, *, hnsw_m: int = 32, hnsw_ef_construction: int = 80,
                      ivf_nlist: int = 1) -> faiss.IndexIDMap2:
    """An empty ``IndexIDMap2`` over an inner-product index of ``kind`` (IVF still needs training)."""
    if kind == "flat":
        inner: faiss.Index = faiss.IndexFlatIP(dimension)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dimension, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = hnsw_ef_construction
    elif kind == "ivf":
        inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(dimension), dimension, ivf_nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        raise InvalidArgumentError(f"unknown index kind {kind!r}; use 'flat', 'hnsw' or 'ivf'")
    return faiss.IndexIDMap2(inner)  # the Python wrapper keeps `inner` alive


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 copy with unit-L2 rows; zero or non-finite rows raise :class:`InvalidQueryError`."""
    x = np.array(vectors, dtype=np.float32, copy=True)
    norms = np.linalg.norm(x, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise InvalidQueryError(f"embedding row {int(np.argmax(bad))} is zero or not finite; it cannot be normalised")
    x /= norms[:, None]
    return x


def _meta_key(key: str, value: Any) -> tuple[str, Hashable] | None:
    """Inverted-index key of a scalar metadata value (bools kept apart from 0/1); None if not indexable."""
    if isinstance(value, bool):
        return key, ("bool", value)
    if isinstance(value, (str, int, float)):
        return key, value
    return None


@contextlib.contextmanager
def _faiss_threads(n: int | None) -> Iterator[None]:
    """Run FAISS with ``n`` OpenMP threads for the duration (None: leave the global setting)."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@dataclass
class _Record:
    fid: int
    ref_doc_id: str | None
    metadata: dict[str, Any]  # the scalar (filterable) metadata only


class FaissVectorStore(BasePydanticVectorStore):
    """LlamaIndex vector store over FAISS, for one embedder (name and dimension are recorded).

    Create it empty with the embedder's identity, add nodes that carry embeddings, then
    :meth:`save` it into an :class:`~ragkit.store.index_dir.IndexDirectory`; reopen with :meth:`load`.
    """

    stores_text: bool = True
    flat_metadata: bool = False
    embedder_name: str = Field(description="stable id of the embedder that produced the vectors")
    embedder_fingerprint: str | None = Field(
        default=None, description="content hash of the embedder (weights, pooling, normalization, config)")
    embedder_source: str | None = Field(default=None, description="what loads the embedder again: 'default', a dir")
    dimension: int = Field(gt=0, description="embedding dimension")
    kind: IndexKind = Field(default="flat", description="'flat' (exact), 'hnsw' or 'ivf'")
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    ivf_nlist: int | None = Field(default=None, description="IVF lists; None: about 4*sqrt(n) of the first batch")
    ivf_nprobe: int = 16
    compact_ratio: float = Field(default=0.25, gt=0, le=1, description="tombstone fraction that triggers a rebuild")
    exact_filter_below: int = Field(
        default=2048, ge=0, description="filters matching at most this many nodes are scored exactly (HNSW/IVF "
        "searches with very selective filters return too few hits)")
    query_threads: int | None = Field(
        default=1, description="FAISS threads for one query; None keeps FAISS's global setting. One HNSW/IVF query "
        "uses one thread anyway, and waking an idle OpenMP team costs ~25 ms on a busy machine (see docs/store.md)")

    _index: faiss.IndexIDMap2 | None = PrivateAttr(default=None)
    _nodes: SimpleKVStore = PrivateAttr(default_factory=SimpleKVStore)
    _records: dict[str, _Record] = PrivateAttr(default_factory=dict)
    _node_of_fid: dict[int, str] = PrivateAttr(default_factory=dict)
    _ref_docs: dict[str, set[str]] = PrivateAttr(default_factory=dict)
    _meta_index: dict[tuple[str, Hashable], set[int]] = PrivateAttr(default_factory=dict)
    _tombstones: set[int] = PrivateAttr(default_factory=set)
    _next_fid: int = PrivateAttr(default=0)

    def model_post_init(self, __context: Any) -> None:
        if self.kind != "ivf":
            self._index = self._empty_index()

    @classmethod
    def from_embedder(cls, embedder: Any, **kwargs: Any) -> FaissVectorStore:
        """A store for an embedder exposing ``model_name`` and ``dimension`` (and, as ragkit's does,
        ``fingerprint`` and ``source``)."""
        return cls(embedder_name=embedder.model_name, dimension=embedder.dimension,
                   embedder_fingerprint=getattr(embedder, "fingerprint", None),
                   embedder_source=getattr(embedder, "source", None), **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "RagkitFaissVectorStore"

    @property
    def client(self) -> faiss.IndexIDMap2 | None:
        """The FAISS index (None for an IVF store not trained yet)."""
        return self._index

    @property
    def node_count(self) -> int:
        """Number of live nodes. (No ``__len__``: an empty store must stay truthy, as LlamaIndex tests
        ``vector_store or SimpleVectorStore()``.)"""
        return len(self._records)

    @property
    def num_tombstones(self) -> int:
        return len(self._tombstones)

    def ref_doc_ids(self) -> set[str]:
        """The ids of the source documents that have nodes in the store."""
        return set(self._ref_docs)

    # ---- writing ----------------------------------------------------------------------------------
    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """Add nodes (each with an embedding); a node id already present is replaced (upsert)."""
        if not nodes:
            return []
        latest = {node.node_id: node for node in nodes}  # within a batch, the last copy wins
        batch = list(latest.values())
        vectors = self._checked_vectors([self._embedding_of(n) for n in batch], what="node embeddings")
        if self._index is None:
            self.train(vectors)
        replaced = [nid for nid in latest if nid in self._records]
        if replaced:
            self._remove(replaced)
        fids = np.arange(self._next_fid, self._next_fid + len(batch), dtype=np.int64)
        self._index.add_with_ids(vectors, fids)
        self._next_fid += len(batch)
        for node, fid in zip(batch, fids.tolist()):
            copy = node.model_copy()
            copy.embedding = None
            self._nodes.put(node.node_id, doc_to_json(copy))
            self._index_record(node.node_id, _Record(fid, node.ref_doc_id, self._scalar_metadata(node.metadata)))
        return list(latest)

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the source document ``ref_doc_id`` (no-op if there is none)."""
        self._remove(list(self._ref_docs.get(ref_doc_id, ())))

    def delete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                     **delete_kwargs: Any) -> None:
        """Delete the nodes with these ids and/or matching these filters (both given: both must hold)."""
        if node_ids is None and filters is None:
            raise InvalidQueryError("delete_nodes needs node_ids or filters; use clear() to delete everything")
        targets = set(self._records) if node_ids is None else {n for n in node_ids if n in self._records}
        if filters is not None:
            matching = self._filter_fids(filters)
            targets = {n for n in targets if self._records[n].fid in matching}
        self._remove(list(targets))

    def clear(self) -> None:
        """Delete every node (the IVF training, if any, is kept)."""
        self._remove(list(self._records))
        self.compact()

    def train(self, embeddings: np.ndarray) -> None:
        """Train an IVF store's coarse quantizer on ``embeddings`` (done on the first batch otherwise)."""
        if self.kind != "ivf":
            raise InvalidQueryError(f"train() is for kind='ivf'; this store is {self.kind!r} and needs no training")
        if self._records:
            raise InvalidQueryError("the IVF store already holds vectors; use compact(retrain=True) to retrain it")
        self._index = self._trained_ivf(self._checked_vectors(embeddings, what="training vectors"))
        self._tombstones.clear()

    def compact(self, *, retrain: bool = False) -> None:
        """Rebuild the FAISS index from the live vectors, dropping tombstones (IVF: optionally retrain)."""
        if self._index is None:
            return
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        if len(ids) == 0 and not retrain:
            self._tombstones.clear()
            return
        vectors = faiss.downcast_index(self._index.index).reconstruct_n(0, len(ids))
        live = ~np.isin(ids, np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones)))
        ids, vectors = ids[live], vectors[live]
        if self.kind == "ivf":
            if retrain and len(vectors):
                index = self._trained_ivf(vectors)
            else:
                index = faiss.clone_index(self._index)
                index.reset()
                faiss.extract_index_ivf(index).make_direct_map()
        else:
            index = self._empty_index()
        index.add_with_ids(vectors, ids)
        self._index = index
        self._tombstones.clear()

    # ---- querying ---------------------------------------------------------------------------------
    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """Top-k nodes by cosine similarity, optionally restricted by filters, doc_ids and node_ids."""
        if query.mode != VectorStoreQueryMode.DEFAULT:
            raise InvalidQueryError(f"query mode {query.mode.value!r} is not supported; ragkit's store does dense search")
        k = query.similarity_top_k
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InvalidQueryError(f"top_k must be a positive integer, got {k!r}; ask for at least 1 result")
        if query.query_embedding is None:
            raise InvalidQueryError("the query has no embedding; embed the query text with the index's embedder")
        x = self._checked_vectors([query.query_embedding], what="the query embedding")
        allowed = self._allowed_fids(query)
        n_candidates = len(self._records) if allowed is None else len(allowed)
        if n_candidates == 0:
            return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
        want = min(k, n_candidates)
        if allowed is not None and (self.kind == "flat" or n_candidates <= self.exact_filter_below):
            fids, scores = (self._search(x, want, allowed) if self.kind == "flat" else self._exact(x, want, allowed))
        else:
            fids, scores = self._search(x, want, allowed)
            if len(fids) < want:  # approximate search missed: score the candidates exactly
                fids, scores = self._exact(x, want, allowed if allowed is not None else
                                           {r.fid for r in self._records.values()})
        node_ids = [self._node_of_fid[f] for f in fids]
        nodes = [json_to_doc(self._nodes.get(n)) for n in node_ids]
        return VectorStoreQueryResult(nodes=nodes, similarities=[float(s) for s in scores], ids=node_ids)

    def get_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None) -> list[BaseNode]:
        """Nodes by id and/or filter (stored copies, without embeddings)."""
        ids = list(self._records) if node_ids is None else [n for n in node_ids if n in self._records]
        if filters is not None:
            matching = self._filter_fids(filters)
            ids = [n for n in ids if self._records[n].fid in matching]
        return [json_to_doc(self._nodes.get(n)) for n in ids]

    def _search(self, x: np.ndarray, k: int, allowed: set[int] | None) -> tuple[list[int], list[float]]:
        if allowed is not None:
            sel: faiss.IDSelector | None = faiss.IDSelectorBatch(np.fromiter(allowed, np.int64, len(allowed)))
        elif self._tombstones:
            dead = faiss.IDSelectorBatch(np.fromiter(self._tombstones, np.int64, len(self._tombstones)))
            sel = faiss.IDSelectorNot(dead)
        else:
            sel = None
        if self.kind == "hnsw":
            params: faiss.SearchParameters = faiss.SearchParametersHNSW(efSearch=max(self.hnsw_ef_search, k), sel=sel)
        elif self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=self.ivf_nprobe, sel=sel)
        else:
            params = faiss.SearchParameters(sel=sel)
        with _faiss_threads(self.query_threads):
            scores, labels = self._index.search(x, k, params=params)
        hit = labels[0] >= 0
        return labels[0][hit].tolist(), scores[0][hit].tolist()

    def _exact(self, x: np.ndarray, k: int, fids: Iterable[int]) -> tuple[list[int], list[float]]:
        ids = np.fromiter(fids, dtype=np.int64)
        vectors = np.vstack([self._index.reconstruct(int(i)) for i in ids])
        scores = vectors @ x[0]
        top = np.argsort(-scores, kind="stable")[:k]
        return ids[top].tolist(), scores[top].tolist()

    def _allowed_fids(self, query: VectorStoreQuery) -> set[int] | None:
        # empty doc_ids / node_ids lists mean "no restriction", as in LlamaIndex's own stores (its
        # retriever passes node_ids=[] for stores that keep text)
        allowed = None if query.filters is None else self._filter_fids(query.filters)
        if query.doc_ids:
            in_docs = {self._records[n].fid for d in query.doc_ids for n in self._ref_docs.get(d, ())}
            allowed = in_docs if allowed is None else allowed & in_docs
        if query.node_ids:
            by_id = {self._records[n].fid for n in query.node_ids if n in self._records}
            allowed = by_id if allowed is None else allowed & by_id
        return allowed

    def _filter_fids(self, filters: MetadataFilters) -> set[int]:
        """FAISS ids of the live nodes matching ``filters`` (EQ / IN leaves, AND / OR nodes)."""
        sets: list[set[int]] = []
        for f in filters.filters:
            if isinstance(f, MetadataFilters):
                sets.append(self._filter_fids(f))
            else:
                sets.append(self._leaf_fids(f))
        condition = filters.condition or FilterCondition.AND
        if condition == FilterCondition.AND:
            if not sets:
                return {r.fid for r in self._records.values()}
            return set.intersection(*sets)
        if condition == FilterCondition.OR:
            return set().union(*sets)
        raise InvalidQueryError(f"filter condition {condition.value!r} is not supported; use 'and' or 'or'")

    def _leaf_fids(self, f: MetadataFilter) -> set[int]:
        if f.operator == FilterOperator.EQ:
            values = [f.value]
        elif f.operator == FilterOperator.IN:
            if not isinstance(f.value, list):
                raise InvalidQueryError(f"filter {f.key!r} 'in' needs a list of values, got {f.value!r}")
            values = f.value
        else:
            raise InvalidQueryError(
                f"filter operator {f.operator.value!r} on {f.key!r} is not supported; use '==' (EQ) or 'in' (IN)"
            )
        out: set[int] = set()
        for v in values:
            key = _meta_key(f.key, v)
            if key is None:
                raise InvalidQueryError(f"filter value {v!r} for {f.key!r} must be a str, int, float or bool")
            out |= self._meta_index.get(key, set())
        return out

    # ---- bookkeeping ------------------------------------------------------------------------------
    def _empty_index(self, ivf_nlist: int = 1) -> faiss.IndexIDMap2:
        return build_faiss_index(self.kind, self.dimension, hnsw_m=self.hnsw_m,
                                 hnsw_ef_construction=self.hnsw_ef_construction, ivf_nlist=ivf_nlist)

    def _trained_ivf(self, vectors: np.ndarray) -> faiss.IndexIDMap2:
        """An empty IVF index trained on ``vectors`` (nlist: the configured one, else ~4*sqrt(n))."""
        nlist = self.ivf_nlist or max(1, min(int(4 * np.sqrt(len(vectors))), len(vectors) // 39))
        index = self._empty_index(nlist)
        index.train(vectors)
        faiss.extract_index_ivf(index).make_direct_map()  # reconstruct() for exact scoring and compaction
        return index

    def _embedding_of(self, node: BaseNode) -> list[float]:
        if node.embedding is None:
            raise InvalidQueryError(f"node {node.node_id!r} has no embedding; embed nodes before adding them")
        if len(node.embedding) != self.dimension:
            self._checked_vectors([node.embedding], what=f"node {node.node_id!r}'s embedding")
        return node.embedding

    def _checked_vectors(self, rows: Any, *, what: str) -> np.ndarray:
        x = np.asarray(rows, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dimension:
            got = x.shape[-1] if x.ndim >= 1 else 0
            raise EmbedderMismatchError(
                f"{what} has dimension {got}, but this index was built by {self.embedder_name!r} with dimension "
                f"{self.dimension}. Embed with {self.embedder_name!r}, or build a new index for the other embedder."
            )
        return normalize_rows(x)

    @staticmethod
    def _scalar_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in metadata.items() if _meta_key(k, v) is not None}

    def _index_record(self, node_id: str, rec: _Record) -> None:
        self._records[node_id] = rec
        self._node_of_fid[rec.fid] = node_id
        if rec.ref_doc_id is not None:
            self._ref_docs.setdefault(rec.ref_doc_id, set()).add(node_id)
        meta_index = self._meta_index  # private attributes of a pydantic model are slow to look up
        for k, v in rec.metadata.items():
            meta_index.setdefault(_meta_key(k, v), set()).add(rec.fid)

    def _remove(self, node_ids: list[str]) -> None:
        """Forget these nodes everywhere; flat removes vectors, HNSW/IVF tombstone them."""
        if not node_ids:
            return
        fids = []
        for nid in node_ids:
            rec = self._records.pop(nid)
            fids.append(rec.fid)
            del self._node_of_fid[rec.fid]
            if rec.ref_doc_id is not None:
                docs = self._ref_docs[rec.ref_doc_id]
                docs.discard(nid)
                if not docs:
                    del self._ref_docs[rec.ref_doc_id]
            for k, v in rec.metadata.items():
                key = _meta_key(k, v)
                self._meta_index[key].discard(rec.fid)
                if not self._meta_index[key]:
                    del self._meta_index[key]
            self._nodes.delete(nid)
        if self.kind == "flat":
            self._index.remove_ids(np.array(fids, dtype=np.int64))
        else:
            self._tombstones.update(fids)
            if len(self._tombstones) > self.compact_ratio * max(self._index.ntotal, 1):
                self.compact()

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, index_dir: IndexDirectory | str | os.PathLike[str], *,
             extra: Callable[[SnapshotWriter], None] | None = None, force: bool = False) -> Snapshot:
        """Write a new snapshot of the store (plus ``extra(writer)``'s files) and make it live atomically.

        ``extra`` lets the caller add its own files (e.g. the ingestion docstore) to the same snapshot.
        """
        directory = index_dir if isinstance(index_dir, IndexDirectory) else IndexDirectory(index_dir)

        def write(w: SnapshotWriter) -> None:
            if self._index is not None:
                faiss.write_index(self._index, str(w.path(FAISS_FILE)))
            w.write_bytes(STATE_FILE, json.dumps(self._state()).encode())
            w.write_bytes(NODES_FILE, json.dumps(self._nodes.to_dict()).encode())
            if extra is not None:
                extra(w)

        return directory.commit(write, meta=self._manifest_meta(), force=force)

    def persist(self, persist_path: str, fs: Any = None) -> None:
        """LlamaIndex's persist hook: :meth:`save` into the index directory ``persist_path``."""
        if fs is not None:
            raise NotImplementedError("FaissVectorStore persists to the local filesystem only (fs must be None)")
        self.save(persist_path)

    @classmethod
    def from_persist_dir(cls, persist_dir: str, namespace: str = "default", fs: Any = None) -> FaissVectorStore:
        """LlamaIndex's reload hook: the store :meth:`persist` wrote for ``StorageContext.persist(persist_dir)``
        (an index directory named ``{namespace}__vector_store.json`` inside it, as LlamaIndex names it)."""
        if fs is not None:
            raise NotImplementedError("FaissVectorStore persists to the local filesystem only (fs must be None)")
        from llama_index.core.vector_stores.simple import NAMESPACE_SEP
        from llama_index.core.vector_stores.types import DEFAULT_PERSIST_FNAME

        return cls.load(Path(persist_dir) / f"{namespace}{NAMESPACE_SEP}{DEFAULT_PERSIST_FNAME}")

    @classmethod
    def load(cls, source: IndexDirectory | Snapshot | str | os.PathLike[str], *, embedder_name: str | None = None,
             dimension: int | None = None, fingerprint: str | None = None, verify: bool = True) -> FaissVectorStore:
        """Open the live snapshot of an index directory (or a given snapshot).

        With ``embedder_name``/``dimension``/``fingerprint`` given, an index built by another embedder
        raises :class:`EmbedderMismatchError` (a different content fingerprint is another embedder,
        whatever its name); a damaged one raises :class:`IndexCorruptError`. Reading an index directory
        retries when a writer's commit removed the snapshot being read.
        """
        if not isinstance(source, Snapshot):
            directory = source if isinstance(source, IndexDirectory) else IndexDirectory(source)
            return directory.read(lambda snap: cls.load(snap, embedder_name=embedder_name, dimension=dimension,
                                                        fingerprint=fingerprint), verify=verify)
        snap = source
        embedder, index_meta = recorded_embedder(snap), snap.meta.get("index")
        if not isinstance(index_meta, dict):
            raise IndexCorruptError(f"{snap.path / 'manifest.json'} lacks the embedder/index entries of a ragkit store")
        built_by, built_dim, built_fp = embedder["name"], int(embedder["dimension"]), embedder.get("fingerprint")
        same = built_fp == fingerprint if fingerprint and built_fp else embedder_name in (None, built_by)
        if not same or dimension not in (None, built_dim):
            raise EmbedderMismatchError(
                f"index {snap.path.parent} was built with embedder {_describe(built_by, built_dim, built_fp)}, but "
                f"it is being opened with {_describe(embedder_name or built_by, dimension or built_dim, fingerprint)}: "
                f"another model, or the same weights with other pooling/normalization/config. Open it without "
                f"--embed-model (it remembers its embedder{' at ' + embedder['source'] if embedder.get('source') else ''}), "
                f"or build a new index (another --index directory, or --force to replace it)."
            )
        try:
            state = json.loads(snap.read_bytes(STATE_FILE))
            store = cls(embedder_name=built_by, dimension=built_dim, embedder_fingerprint=built_fp,
                        embedder_source=embedder.get("source"), **index_meta["params"], kind=index_meta["kind"])
            store._nodes = SimpleKVStore.from_dict(json.loads(snap.read_bytes(NODES_FILE)))
            store._index = faiss.read_index(str(snap.file(FAISS_FILE))) if snap.has(FAISS_FILE) else None
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise IndexCorruptError(f"snapshot {snap.path} cannot be read ({type(e).__name__}: {e}); rebuild the index "
                                    f"or restore it (--force replaces it)") from e
        store._restore_state(state, snap.path)
        return store

    def _manifest_meta(self) -> dict[str, Any]:
        params = {name: getattr(self, name) for name in
                  ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nlist", "ivf_nprobe", "compact_ratio",
                   "exact_filter_below", "query_threads")}
        return {
            "embedder": {"name": self.embedder_name, "dimension": self.dimension,
                         **{k: v for k, v in (("fingerprint", self.embedder_fingerprint),
                                              ("source", self.embedder_source)) if v is not None}},
            "index": {"kind": self.kind, "params": params, "faiss_version": faiss.__version__},
            "counts": {"nodes": len(self._records), "ref_docs": len(self._ref_docs),
                       "faiss_vectors": 0 if self._index is None else int(self._index.ntotal),
                       "tombstones": len(self._tombstones)},
        }

    def _state(self) -> dict[str, Any]:
        return {
            "format": STORE_FORMAT,
            "next_fid": self._next_fid,
            "tombstones": sorted(self._tombstones),
            "nodes": {nid: [r.fid, r.ref_doc_id, r.metadata] for nid, r in self._records.items()},
        }

    def _restore_state(self, state: dict[str, Any], where: Path) -> None:
        try:
            if state["format"] != STORE_FORMAT:
                raise ValueError(f"store format {state['format']!r}, expected {STORE_FORMAT}")
            self._next_fid = int(state["next_fid"])
            self._tombstones = set(state["tombstones"])
            for nid, (fid, ref_doc_id, metadata) in state["nodes"].items():
                self._index_record(nid, _Record(int(fid), ref_doc_id, metadata))
        except (KeyError, TypeError, ValueError) as e:
            raise IndexCorruptError(f"{where / STATE_FILE} is not a valid store state ({e}); rebuild the index") from e
        ntotal = 0 if self._index is None else self._index.ntotal
        n_stored = len(self._nodes.get_all())
        if ntotal != len(self._records) + len(self._tombstones) or n_stored != len(self._records):
            raise IndexCorruptError(
                f"snapshot {where} is inconsistent: {ntotal} vectors, {len(self._records)} nodes + "
                f"{len(self._tombstones)} tombstones, {n_stored} stored nodes; rebuild the index"
            )


def _describe(name: str, dimension: int, fingerprint: str | None) -> str:
    content = f", content fingerprint {fingerprint[:12]}" if fingerprint else ""
    return f"{name!r} (dimension {dimension}{content})"


def recorded_embedder(snap: Snapshot) -> dict[str, Any]:
    """The embedder a snapshot's manifest records (name, dimension, fingerprint, source)."""
    embedder = snap.meta.get("embedder")
    if not (isinstance(embedder, dict) and isinstance(embedder.get("name"), str)
            and isinstance(embedder.get("dimension"), int)):
        raise IndexCorruptError(f"{snap.path / 'manifest.json'} lacks the embedder/index entries of a ragkit store")
    return embedder
