"""``Pipeline``: ingest documents into a persistent index, retrieve chunks, answer questions with sources.

Defaults are the embedded models: all-MiniLM-L6-v2 for embeddings and SmolLM2-135M-Instruct for
answers (loaded lazily, only by :meth:`Pipeline.query`). With ``index_dir`` every change is committed as
one new snapshot of a crash-safe :class:`~ragkit.store.IndexDirectory` holding the FAISS store *and*
the ingestion docstore (document hashes) and file registry, so they can never disagree.

Any other LlamaIndex vector store can be passed as ``vector_store=`` (e.g. a server-based one); the
server then persists the vectors and ``index_dir`` (optional) keeps only the hashes and registry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_index.core.schema import NodeWithScore
from llama_index.core.storage.docstore import SimpleDocumentStore
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
)

from pydantic import BaseModel

from ragkit import structured
from ragkit.context import STOP_SEQUENCES, AssembledContext, assemble_context, chunk_label, get_ordering
from ragkit.errors import (
    EmbedderMismatchError,
    EmptyIndexError,
    IndexCorruptError,
    InvalidQueryError,
    InvalidSettingError,
    ModelNotFoundError,
    RagkitError,
)
from ragkit.index_info import INGEST_DOCSTORE_FILE, PIPELINE_FILE, SOURCES_FILE, read_settings, read_sources
from ragkit.ingest import Ingestor, IngestSummary
from ragkit.store import FaissVectorStore, IndexDirectory, Snapshot, SnapshotWriter
from ragkit.store.pgvector import StatefulStore, StoreState, open_pg_store
from ragkit.store.url import is_store_url, redact_url


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """A chunk an answer was built from."""

    file: str
    position: int  # chunk index within the file's part
    part: int
    score: float
    text: str
    node_id: str

    @property
    def label(self) -> str:
        return chunk_label(Path(self.file).name, self.part, self.position)


@dataclass
class Answer:
    """An LLM answer with the chunks it saw and the tokens it used."""

    text: str
    sources: list[Source]
    prompt_tokens: int
    completion_tokens: int
    dropped: list[Source] = field(default_factory=list)  # retrieved, but did not fit the context window
    ordering: str = "score"
    output: Any = None  # with query(output_cls=Model): the validated Model instance

    def __str__(self) -> str:
        return self.text


def _to_source(n: NodeWithScore) -> Source:
    meta = n.node.metadata
    return Source(
        file=str(meta.get("file_path", n.node.ref_doc_id or "")),
        position=int(meta.get("chunk_index", 0)),
        part=int(meta.get("part", 0)),
        score=float(n.score or 0.0),
        text=n.node.get_content(),
        node_id=n.node.node_id,
    )


class Pipeline:
    """Ingest / retrieve / query / delete over one index.

    ``embed_model``: None (the embedder the index records, or the embedded MiniLM for a new index), a
    model name/path, or a ``SentenceTransformerEmbedding``; one whose content differs from the index's
    is refused (:class:`EmbedderMismatchError`). ``chunk_tokens``: None keeps the index's chunk size; a
    different size is refused (:class:`InvalidSettingError`): an index never mixes chunk sizes.
    ``llm``: None (embedded SmolLM2, loaded at the first ``query``), a model name/path, or a ``LocalLLM``.
    ``force=True`` replaces a corrupt index, or one built by another embedder or chunk size, at the next
    write. ``lock_timeout``: seconds a writer waits for another one. ``commit_seconds``: an ingest
    commits what it has embedded at the first file boundary after this many seconds, so a killed
    ingest loses at most that much work.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike[str] | None = None,
        *,
        llm: Any = None,
        embed_model: Any = None,
        vector_store: BasePydanticVectorStore | str | None = None,
        top_k: int = 5,
        ordering: str = "score",
        chunk_tokens: int | None = None,
        max_new_tokens: int = 256,
        force: bool = False,
        store_kind: str = "flat",
        lock_timeout: float = 0.0,
        commit_seconds: float = 60.0,
    ):
        get_ordering(ordering)  # fail early on a typo
        _check_top_k(top_k)
        self.top_k = top_k
        self.ordering = ordering
        self.max_new_tokens = max_new_tokens
        self.force = force
        self._llm_arg = llm if llm is not None else "default"
        self._llm: Any = None if isinstance(self._llm_arg, (str, os.PathLike)) else self._llm_arg
        self.commit_seconds = commit_seconds
        self.directory = IndexDirectory(index_dir, lock_timeout=lock_timeout) if index_dir is not None else None
        self.embed_model = self._embedder(embed_model)
        self._external_store = _server_store(vector_store, self.embed_model, index_dir)
        self._store_kind = store_kind
        self._chunk_tokens = chunk_tokens
        self._snapshot_name: str | None = None
        self._load()

    @classmethod
    def load(cls, index_dir: str | os.PathLike[str], **kwargs: Any) -> Pipeline:
        """Open an existing index; :class:`IndexNotFoundError` if there is none at ``index_dir``."""
        IndexDirectory(index_dir).require()
        return cls(index_dir, **kwargs)

    # ---- state ------------------------------------------------------------------------------------
    def _embedder(self, embed_model: Any) -> Any:
        """The embedder asked for; else the one the index records (loaded from its source); else MiniLM."""
        from ragkit.embed import DEFAULT_NAME, SentenceTransformerEmbedding

        if embed_model is not None and not isinstance(embed_model, (str, os.PathLike)):
            return embed_model
        if embed_model is not None:
            log.info("loading the embedder %s", os.fspath(embed_model))
            return SentenceTransformerEmbedding(os.fspath(embed_model))
        recorded = self._recorded().get("embedder")
        if not recorded:
            log.info("loading the embedder default")
            return SentenceTransformerEmbedding("default")
        name = recorded.get("name")
        source = recorded.get("source") or ("default" if name == DEFAULT_NAME else name)
        log.info("loading the index's embedder %s (%s)", name, source)
        try:
            return SentenceTransformerEmbedding(source)
        except RagkitError as exc:
            problem = "which no longer exists" if Path(source).is_absolute() and not Path(source).exists() \
                else f"which cannot be loaded here ({exc})"
            raise ModelNotFoundError(
                f"index {self.directory.path if self.directory else ''} was built with embedder {name!r} from "
                f"{source}, {problem}. Put that model back at {source}, or pass "
                f"--embed-model DIR (embed_model=) with the same model (content fingerprint "
                f"{str(recorded.get('fingerprint'))[:12]})."
            ) from exc

    def _recorded(self) -> dict[str, Any]:
        """The live snapshot's pipeline settings (embedder identity, chunker); {} for no or a bad index."""
        if self.directory is None or not self.directory.exists():
            return {}
        try:
            return self.directory.read(read_settings, verify=False)
        except (IndexCorruptError, OSError, ValueError):
            return {}  # _load says what is wrong (or --force starts afresh)

    def _load(self) -> None:
        """(Re)load the live snapshot, or start empty when there is none (or it is bad and ``force``)."""
        loaded: tuple[Any, ...] = (SimpleDocumentStore(), {}, self._external_store, {}, None)
        if isinstance(self._external_store, StatefulStore):  # server-backed: the state lives beside the vectors
            loaded = self._read_server_state(self._external_store)
        elif self.directory is not None and self.directory.exists():
            try:
                loaded = self.directory.read(self._read_snapshot)
            except (IndexCorruptError, EmbedderMismatchError, InvalidSettingError):
                if not self.force:
                    raise
                # --force: start afresh; the next commit replaces it
        elif self.directory is not None:
            self.directory.check_writable(force=self.force)
        docstore, sources, store, recorded, self._snapshot_name = loaded
        if store is None:
            store = FaissVectorStore.from_embedder(self.embed_model, kind=self._store_kind)
        self.vector_store = store
        self.ingestor = Ingestor(self.embed_model, store, docstore=docstore, sources=sources,
                                 # an index keeps the chunk size it was built with: re-ingesting gives the same chunks
                                 chunk_tokens=recorded.get("chunk_tokens") if self._chunk_tokens is None
                                 else self._chunk_tokens)

    def _read_snapshot(self, snap: Snapshot) -> tuple[Any, ...]:
        """(docstore, sources, store, settings, name) of ``snap``, checked against this pipeline's embedder
        and chunk size."""
        store = self._external_store
        if store is None:
            store = FaissVectorStore.load(snap, embedder_name=self.embed_model.model_name,
                                          dimension=self.embed_model.dimension,
                                          fingerprint=getattr(self.embed_model, "fingerprint", None))
        recorded = read_settings(snap)
        docstore, sources = SimpleDocumentStore(), {}
        if snap.has(INGEST_DOCSTORE_FILE):
            docstore = SimpleDocumentStore.from_dict(json.loads(snap.read_bytes(INGEST_DOCSTORE_FILE)))
            sources = read_sources(snap)
        self._check_chunk_tokens(recorded, sources, f"index {snap.path.parent}")
        return docstore, sources, store, recorded, snap.name

    def _read_server_state(self, store: StatefulStore) -> tuple[Any, ...]:
        """(docstore, sources, store, settings, None) committed in a server-backed store; checked like a
        snapshot (the store itself refuses another embedder's table)."""
        state = store.load_state(force=self.force)
        try:
            self._check_chunk_tokens(state.pipeline, state.sources, f"store {redact_url(store.url)}")
        except InvalidSettingError:
            if not self.force:
                raise
            store.reset()  # --force: start afresh; the next commit replaces its rows
            return SimpleDocumentStore(), {}, store, {}, None
        return SimpleDocumentStore.from_dict(state.docstore), state.sources, store, state.pipeline, None

    def _check_chunk_tokens(self, recorded: dict[str, Any], sources: dict[str, Any], where: str) -> None:
        """InvalidSettingError when an explicit ``chunk_tokens`` differs from the size the index was built with."""
        built = recorded.get("chunk_tokens")
        if self._chunk_tokens is not None and built is not None and sources and self._chunk_tokens != built:
            raise InvalidSettingError(
                f"{where} was built with {built}-token chunks (--chunk-tokens {built}); "
                f"{self._chunk_tokens} would mix chunk sizes in one index. Leave --chunk-tokens unset to keep "
                f"{built}, or build a new index (another --index directory or table=, or --force to replace it)."
            )

    def _reload_if_changed(self) -> None:
        if isinstance(self.vector_store, StatefulStore) and self.vector_store.changed_since_load():
            self._load()
        if self.directory is not None and self.directory.exists():
            try:
                live = self.directory.current_name()
            except IndexCorruptError:
                live = None
            if live != self._snapshot_name:
                self._load()

    def _save(self) -> None:
        if isinstance(self.vector_store, StatefulStore):
            self.vector_store.commit_state(StoreState(self.ingestor.docstore.to_dict(), self.ingestor.sources,
                                                      self._settings()))
            return
        if self.directory is None:
            return
        docstore = json.dumps(self.ingestor.docstore.to_dict()).encode()
        sources = json.dumps(self.ingestor.sources).encode()
        pipeline = json.dumps(self._settings()).encode()

        def extra(w: SnapshotWriter) -> None:
            w.write_bytes(INGEST_DOCSTORE_FILE, docstore)
            w.write_bytes(SOURCES_FILE, sources)
            w.write_bytes(PIPELINE_FILE, pipeline)

        if isinstance(self.vector_store, FaissVectorStore):
            snap = self.vector_store.save(self.directory, extra=extra, force=self.force)
        else:  # an external store persists itself; the directory keeps the hashes and registry
            snap = self.directory.commit(extra, meta={"external_store": type(self.vector_store).__name__},
                                         force=self.force)
        self._snapshot_name = snap.name

    def _settings(self) -> dict[str, Any]:
        """The pipeline settings an index records: chunk size, chunker, embedder identity."""
        identity = getattr(self.embed_model, "identity", None) or {"name": self.embed_model.model_name}
        return {"chunk_tokens": self.chunk_tokens, "chunker": type(self.ingestor.splitter).__name__,
                "embedder": identity}

    def _writing(self) -> Any:
        """Context for a read-modify-write: holds the directory lock and picks up others' commits."""
        if self.directory is None:
            return contextlib.nullcontext()
        return self.directory.lock()

    @property
    def chunk_tokens(self) -> int:
        """Most tokens per chunk, special tokens included."""
        chunker = self.ingestor.splitter.chunker
        return chunker.budget + chunker.n_special

    # ---- API --------------------------------------------------------------------------------------
    def ingest(self, paths_or_documents: Any, show_progress: bool = True, *, sync: bool = True) -> IngestSummary:
        """Ingest files, directories or LlamaIndex ``Document`` s, committing a snapshot every
        ``commit_seconds`` of work and at the end (if anything changed).

        ``sync=True``: files indexed earlier under a directory given here and gone from it are deleted.
        On an error, what was committed stays and the in-memory state is reloaded from the last snapshot.
        """
        with self._writing():
            self._reload_if_changed()
            try:
                persistent = self.directory is not None or isinstance(self.vector_store, StatefulStore)
                checkpoint = self._save if persistent else None
                summary = self.ingestor.ingest(paths_or_documents, show_progress=show_progress, sync=sync,
                                               checkpoint=checkpoint, checkpoint_seconds=self.commit_seconds)
                if self.directory is not None and not self.directory.exists():
                    self._save()  # an empty index is still an index
            except BaseException:
                self._load()
                raise
        return summary

    def delete(self, doc_id_or_path: str | os.PathLike[str]) -> list[str]:
        """Delete a file's chunks (by path) or one document's (by id); returns the deleted document ids."""
        with self._writing():
            self._reload_if_changed()
            try:
                deleted = self.ingestor.delete(doc_id_or_path)
                self._save()
            except BaseException:
                self._load()
                raise
        return deleted

    def retrieve(self, query: str, top_k: int | None = None, filters: Any = None) -> list[NodeWithScore]:
        """The ``top_k`` most similar chunks, best first (score: cosine similarity, higher is better).

        ``filters``: LlamaIndex ``MetadataFilters`` or a dict ``{key: value}`` (a list value means "in").
        """
        top_k = self.top_k if top_k is None else top_k
        _check_top_k(top_k)
        if not isinstance(query, str) or not query.strip():
            raise InvalidQueryError("the query is empty; pass the question or text to search for")
        self._reload_if_changed()
        if getattr(self.vector_store, "node_count", None) == 0:
            where = f" at {self.directory.path}" if self.directory is not None else ""
            raise EmptyIndexError(
                f"the index{where} is empty: nothing to search. Ingest documents first "
                f"(ragkit ingest PATH --index DIR, or Pipeline.ingest)."
            )
        self._warn_if_truncated(query)
        result = self.vector_store.query(VectorStoreQuery(
            query_embedding=self.embed_model.get_query_embedding(query), similarity_top_k=top_k,
            filters=_as_filters(filters),
        ))
        if result.nodes is None:
            raise RagkitError(f"{type(self.vector_store).__name__} returned no node text; use a store that keeps text")
        scores = result.similarities or [None] * len(result.nodes)
        return [NodeWithScore(node=n, score=s) for n, s in zip(result.nodes, scores)]

    def _warn_if_truncated(self, query: str) -> None:
        """Warn when the embedder will read only the start of ``query`` (it truncates at max_seq_length)."""
        limit = self.ingestor.splitter.chunker.max_tokens  # the embedder's max_seq_length
        if len(query) <= limit:  # a token spans at least one character
            return
        n = len(self.ingestor.splitter.chunker.backend.encode(query, add_special_tokens=True).ids)
        if n > limit:
            warnings.warn(
                f"the query has {n} tokens; the embedder {self.embed_model.model_name!r} reads the first {limit} "
                f"(special tokens included) and retrieval ignores the rest. Shorten the query to what to search for.",
                UserWarning, stacklevel=3)

    @property
    def llm(self) -> Any:
        """The LLM, loaded at first use."""
        if self._llm is None:
            log.info("loading the LLM %s", os.fspath(self._llm_arg))
            from ragkit.llm import LocalLLM

            self._llm = LocalLLM(os.fspath(self._llm_arg), max_new_tokens=self.max_new_tokens)
        return self._llm

    def assemble(self, question: str, nodes: list[NodeWithScore], ordering: str | None = None,
                 output_cls: structured.Schema | None = None) -> AssembledContext:
        """The prompt the LLM would get for ``question`` over ``nodes`` (fitted to its context window).

        With ``output_cls`` (a pydantic model class or a JSON-schema dict) the question carries the JSON-schema
        instruction, so the budget counts it.
        """
        llm = self.llm
        if output_cls is not None:
            question = f"{question}\n{structured.instruction(output_cls)}"
        reserve = int(getattr(llm, "max_new_tokens", self.max_new_tokens))
        return assemble_context(nodes, question, counter=llm, context_window=int(llm.context_window),
                                reserve_tokens=reserve, ordering=ordering or self.ordering)

    def query(self, question: str, top_k: int | None = None, filters: Any = None,
              ordering: str | None = None, output_cls: type[BaseModel] | None = None) -> Answer:
        """Retrieve, fit the chunks into the LLM's context window, and answer.

        ``output_cls``: a pydantic model class; the answer is decoded under its JSON schema and returned,
        validated, as ``Answer.output`` (StructuredOutputError with the raw text if it is not one). docs/structured.md.
        """
        log.info("retrieving the %d most similar chunks", self.top_k if top_k is None else top_k)
        nodes = self.retrieve(question, top_k=top_k, filters=filters)
        ctx = self.assemble(question, nodes, ordering, output_cls)
        log.info("generating the answer from %d chunks (%d prompt tokens)", len(ctx.nodes), ctx.prompt_tokens)
        gen: dict[str, Any] = {"json_schema": output_cls} if output_cls is not None else {"stop": list(STOP_SEQUENCES)}
        response = self.llm.chat(ctx.messages, **gen)
        output = None if output_cls is None else structured.from_response(
            response, output_cls, int(getattr(self.llm, "max_new_tokens", self.max_new_tokens)))
        text = (response.message.content or "").strip()
        usage = _usage(response)
        return Answer(
            text=text,
            sources=[_to_source(n) for n in ctx.nodes],
            prompt_tokens=int(usage.get("prompt_tokens", ctx.prompt_tokens)),
            completion_tokens=int(usage.get("completion_tokens", self.llm.count_tokens(text))),
            dropped=[_to_source(n) for n in ctx.dropped],
            ordering=ctx.ordering,
            output=output,
        )

    def info(self) -> dict[str, Any]:
        """What is in the index: embedder, counts, snapshot, files."""
        self._reload_if_changed()
        store = self.vector_store
        info: dict[str, Any] = {
            "index_dir": str(self.directory.path) if self.directory else None,
            "snapshot": self._snapshot_name,
            "embedder": self.embed_model.model_name,
            "dimension": self.embed_model.dimension,
            "max_seq_length": self.embed_model.max_seq_length,
            "chunk_tokens": self.chunk_tokens,
            "vector_store": type(store).__name__,
            "sources": len(self.ingestor.sources),
            "documents": sum(len(v) for v in self.ingestor.sources.values()),
        }
        if getattr(store, "node_count", None) is not None:
            info["chunks"] = store.node_count
        if isinstance(store, FaissVectorStore):
            info["store_kind"] = store.kind
        info["files"] = sorted(self.ingestor.sources)
        return info


def _server_store(store: Any, embed_model: Any, index_dir: Any) -> BasePydanticVectorStore | None:
    """``vector_store=``: None, a ``postgresql://`` URL, or a LlamaIndex store that keeps the node text."""
    if is_store_url(store):
        store = open_pg_store(store, getattr(embed_model, "identity", None) or {"name": embed_model.model_name},
                              embed_model.dimension)
    if store is None:
        return None
    if not getattr(store, "stores_text", False):
        raise RagkitError(f"{type(store).__name__} does not store the node text, so retrieval could not return "
                          f"chunks; use a store with stores_text=True (FAISS, pgvector, Qdrant, ...)")
    if isinstance(store, StatefulStore) and index_dir is not None:
        raise RagkitError(f"{type(store).__name__} keeps its hashes and file registry beside its vectors; "
                          f"drop index_dir (--index) when using it")
    return store


def _check_top_k(top_k: Any) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise InvalidQueryError(f"top_k must be a positive integer, got {top_k!r}; ask for at least 1 chunk")


def _as_filters(filters: Any) -> MetadataFilters | None:
    if filters is None or isinstance(filters, MetadataFilters):
        return filters
    if isinstance(filters, dict):
        return MetadataFilters(filters=[
            MetadataFilter(key=k, value=list(v), operator=FilterOperator.IN) if isinstance(v, (list, tuple, set))
            else MetadataFilter(key=k, value=v, operator=FilterOperator.EQ)
            for k, v in filters.items()
        ])
    raise InvalidQueryError(f"filters must be MetadataFilters or a dict, got {type(filters).__name__}")


def _usage(response: Any) -> dict[str, Any]:
    """Token usage an LLM reported with its response (LocalLLM: prompt_tokens, completion_tokens)."""
    usage: dict[str, Any] = {}
    message = getattr(response, "message", None)
    for source in (getattr(response, "raw", None), getattr(response, "additional_kwargs", None),
                   getattr(message, "additional_kwargs", None)):
        if isinstance(source, dict):
            usage.update({k: v for k, v in source.items() if k in ("prompt_tokens", "completion_tokens")})
    return usage
