"""``PgVectorStore``: LlamaIndex's ``PGVectorStore`` with ragkit's promises (atomic commits, embedder check).

Vectors, text and metadata live in LlamaIndex's table ``data_<table>``; beside it ragkit keeps one row
per store in its own table ``ragkit_stores``: embedder name, dimension, metric, a version counter and
the pipeline state (document hashes, file registry, chunk size, the embedder's identity). As with FAISS
indexes, the embedder is the same when its content fingerprint is (else, without fingerprints, its name). ``add`` and ``delete`` only stage
changes; :meth:`PgVectorStore.commit_state` applies them and the state row in ONE transaction, so a
crash or kill leaves the old set or the new one, never a mix. Search is cosine distance (pgvector
``<=>``); on ragkit's normalized embeddings that ranks exactly like FAISS's inner product, and the
score returned is ``1 - distance`` = cosine similarity. ``index="exact"`` scans every row (exact);
``index="hnsw"`` builds a pgvector HNSW index (``vector_cosine_ops``, approximate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from llama_index.core.schema import BaseNode
from pydantic import BaseModel, Field, PrivateAttr, ValidationError

from ragkit.errors import EmbedderMismatchError, IndexLockedError, RagkitError
from ragkit.store.url import redact_url

STATE_TABLE = "ragkit_stores"
CONNECT_TIMEOUT_S = 3


class StoreUnavailableError(RagkitError):
    """A server-backed vector store cannot be reached (server down, wrong URL, refused login)."""


class StoreOptions(BaseModel):
    """What a ``postgresql://...?table=...&index=...`` URL can ask for besides the connection."""

    table: str = Field("ragkit", pattern=r"^[a-z_][a-z0-9_]{0,40}$")
    index: str = Field("exact", pattern=r"^(exact|hnsw)$")
    hnsw_m: int = Field(16, ge=2)
    hnsw_ef_construction: int = Field(64, ge=4)
    hnsw_ef_search: int = Field(40, ge=1)


@dataclass
class StoreState:
    """The pipeline state kept beside the vectors."""

    docstore: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class StatefulStore(Protocol):
    """A vector store that keeps the pipeline state beside its vectors and commits both atomically."""

    def load_state(self, force: bool = False) -> StoreState: ...

    def commit_state(self, state: StoreState) -> None: ...

    def changed_since_load(self) -> bool: ...

    def reset(self) -> None: ...


def _split_url(url: str) -> tuple[str, StoreOptions]:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    own = {k: query.pop(k) for k in list(query) if k in StoreOptions.model_fields}
    try:
        options = StoreOptions(**own)
    except ValidationError as exc:
        raise RagkitError(f"store URL {redact_url(url)}: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}; "
                          f"table is lower-case letters, digits, _; index is exact or hnsw") from None
    connection = urlunsplit(("postgresql+psycopg2", parts.netloc, parts.path, urlencode(query), ""))
    return connection, options


def open_pg_store(url: str, identity: dict[str, Any], dimension: int) -> Any:
    """Connect to ``url`` (or :class:`StoreUnavailableError` within a few seconds) and return the store.

    ``identity``: the embedder's (``SentenceTransformerEmbedding.identity``, or at least ``{"name": ...}``).
    The class is built at the first call, so ragkit imports without the optional Postgres packages.
    """
    return _store_class()(url, identity, dimension)


def _store_class() -> type:
    global _STORE_CLASS
    if _STORE_CLASS is None:
        _STORE_CLASS = _build_store_class()
    return _STORE_CLASS


_STORE_CLASS: type | None = None


def _build_store_class() -> type:  # noqa: C901 - one class, built once
    try:
        import sqlalchemy as sa
        from llama_index.vector_stores.postgres import PGVectorStore
    except ImportError as exc:
        raise RagkitError("a postgresql:// store needs: pip install 'ragkit[postgres]' "
                          "(llama-index-vector-stores-postgres, psycopg2-binary)") from exc

    class _PgVectorStore(PGVectorStore):  # type: ignore[misc,valid-type]
        """LlamaIndex's PGVectorStore whose writes are staged and committed atomically with ragkit's state."""

        _adds: list[BaseNode] = PrivateAttr(default_factory=list)
        _deletes: set[str] = PrivateAttr(default_factory=set)
        _version: int | None = PrivateAttr(default=None)
        _reset: bool = PrivateAttr(default=False)
        _identity: dict[str, Any] = PrivateAttr(default_factory=dict)
        _embedder: dict[str, Any] = PrivateAttr(default_factory=dict)
        _options: Any = PrivateAttr(default=None)
        _url: str = PrivateAttr(default="")

        def __init__(self, url: str, identity: dict[str, Any], dimension: int):
            connection, options = _split_url(url)
            engine = sa.create_engine(connection, connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
                                      pool_pre_ping=True)
            async_engine = _async_engine(connection)
            super().__init__(
                connection_string=connection, async_connection_string=str(async_engine.url), table_name=options.table,
                embed_dim=dimension, perform_setup=False, engine=engine, async_engine=async_engine,
                hnsw_kwargs={"hnsw_ef_search": options.hnsw_ef_search} if options.index == "hnsw" else None,
            )
            self._options = options
            self._url = redact_url(url)
            self._identity = {"embedder": identity["name"], "dimension": dimension, "metric": "cosine"}
            self._embedder = dict(identity)
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
            except sa.exc.OperationalError as exc:
                raise StoreUnavailableError(
                    f"cannot reach the vector store at {self._url}: {str(exc.orig).strip().splitlines()[0]}. "
                    f"Check that the Postgres server is running and the URL (host, port, database, user) is right."
                ) from None  # the driver's error can carry the URL with its password
            self._initialize()

        @property
        def url(self) -> str:
            """The store's URL, password redacted."""
            return self._url

        @property
        def vectors_table(self) -> str:
            return self._table_class.__tablename__

        # ---- state ----------------------------------------------------------------------------
        def _read_row(self, conn: Any) -> Any:
            exists = conn.execute(sa.text("SELECT to_regclass(:t)"), {"t": STATE_TABLE}).scalar()
            if exists is None:
                return None
            return conn.execute(sa.text(f"SELECT embedder, dimension, metric, version, state FROM {STATE_TABLE} "
                                        f"WHERE vectors_table = :t"), {"t": self.vectors_table}).one_or_none()

        def load_state(self, force: bool = False) -> StoreState:
            """Drop staged changes; read the committed state, refusing another embedder's table."""
            self._adds, self._deletes, self._reset = [], set(), False
            with self._engine.connect() as conn:
                row = self._read_row(conn)
                table_exists = conn.execute(sa.text("SELECT to_regclass(:t)"), {"t": self.vectors_table}).scalar()
            if row is None:
                if table_exists is not None and not force:
                    raise EmbedderMismatchError(
                        f"the table {self.vectors_table} at {self._url} was not created by ragkit (no row in "
                        f"{STATE_TABLE}), so its embedder is unknown; use another table= in the URL, or --force "
                        f"to replace its rows")
                self._version, self._reset = None, table_exists is not None
                return StoreState()
            self._version = int(row.version)
            if not self._same_embedder(row):
                if not force:
                    raise EmbedderMismatchError(
                        f"the table {self.vectors_table} at {self._url} was built by embedder {row.embedder!r} "
                        f"(dimension {row.dimension}), not {self._identity['embedder']!r} (dimension "
                        f"{self._identity['dimension']}); use that embedder, another table=, or --force to replace it")
                self._reset = True
                return StoreState()
            state = row.state
            return StoreState(state.get("docstore", {}), state.get("sources", {}), state.get("pipeline", {}))

        def _same_embedder(self, row: Any) -> bool:
            """Same dimension and metric, and the same content fingerprint (the name when either lacks one)."""
            built, fingerprint = row.state.get("embedder", {}).get("fingerprint"), self._embedder.get("fingerprint")
            same = built == fingerprint if built and fingerprint else row.embedder == self._identity["embedder"]
            return same and (row.dimension, row.metric) == (self._identity["dimension"], self._identity["metric"])

        def reset(self) -> None:
            """Drop staged changes; the next commit replaces every row of the table."""
            self._adds, self._deletes, self._reset = [], set(), True

        def committed_version(self, conn: Any = None) -> int | None:
            """The version of the committed state (None before the first commit); another writer bumps it."""
            if conn is None:
                with self._engine.connect() as own:
                    return self.committed_version(own)
            row = self._read_row(conn)
            return None if row is None else int(row.version)

        def changed_since_load(self) -> bool:
            return self.committed_version() != self._version

        def commit_state(self, state: StoreState) -> None:
            """Apply staged deletes and adds and write ``state``, all in one transaction."""
            table = self._table_class.__table__
            with self._engine.begin() as conn:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": self.vectors_table})
                conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS vector"))
                conn.execute(sa.text(
                    f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} (vectors_table text PRIMARY KEY, embedder text NOT NULL, "
                    f"dimension int NOT NULL, metric text NOT NULL, version bigint NOT NULL, state jsonb NOT NULL)"))
                if self.committed_version(conn) != self._version:
                    raise IndexLockedError(
                        f"another writer committed to {self.vectors_table} at {self._url} since this pipeline read "
                        f"it; nothing was written. Retry: the pipeline re-reads the store first")
                table.create(conn, checkfirst=True)
                if self._options.index == "hnsw":
                    o = self._options
                    conn.execute(sa.text(
                        f"CREATE INDEX IF NOT EXISTS {self.vectors_table}_embedding_idx ON {self.vectors_table} "
                        f"USING hnsw (embedding vector_cosine_ops) WITH (m = {o.hnsw_m}, "
                        f"ef_construction = {o.hnsw_ef_construction})"))
                if self._reset:
                    conn.execute(table.delete())
                elif self._deletes:
                    conn.execute(table.delete().where(
                        self._table_class.metadata_["ref_doc_id"].astext.in_(sorted(self._deletes))))
                if self._adds:
                    conn.execute(table.insert(), [self._row(n) for n in self._adds])
                blob = json.dumps({"docstore": state.docstore, "sources": state.sources, "pipeline": state.pipeline,
                                   "embedder": self._embedder})
                version = (self._version or 0) + 1
                conn.execute(sa.text(
                    f"INSERT INTO {STATE_TABLE} VALUES (:t, :e, :d, :m, :v, CAST(:s AS jsonb)) "
                    f"ON CONFLICT (vectors_table) DO UPDATE SET embedder = :e, dimension = :d, metric = :m, "
                    f"version = :v, state = CAST(:s AS jsonb)"),
                    {"t": self.vectors_table, "e": self._identity["embedder"], "d": self._identity["dimension"],
                     "m": self._identity["metric"], "v": version, "s": blob})
            self._adds, self._deletes, self._reset, self._version = [], set(), False, version

        def _row(self, node: BaseNode) -> dict[str, Any]:
            item = self._node_to_table_row(node)
            return {"node_id": item.node_id, "embedding": item.embedding, "text": item.text,
                    "metadata_": item.metadata_}

        # ---- the vector-store API: writes are staged until commit_state ------------------------
        def add(self, nodes: list[BaseNode], **add_kwargs: Any) -> list[str]:
            self._adds.extend(nodes)
            return [n.node_id for n in nodes]

        def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
            self._adds = [n for n in self._adds if n.ref_doc_id != ref_doc_id]
            self._deletes.add(ref_doc_id)

        def delete_nodes(self, *args: Any, **kwargs: Any) -> None:
            raise RagkitError("delete chunks through Pipeline.delete (by file or document), so the state row "
                              "stays in step")

        def clear(self) -> None:
            raise RagkitError("a ragkit pgvector table is cleared with --force at the next ingest")

        @property
        def node_count(self) -> int:
            with self._engine.connect() as conn:
                if conn.execute(sa.text("SELECT to_regclass(:t)"), {"t": self.vectors_table}).scalar() is None:
                    return 0
                return int(conn.execute(sa.text(f"SELECT count(*) FROM {self.vectors_table}")).scalar())

    return _PgVectorStore


def _async_engine(connection: str) -> Any:
    """PGVectorStore wants an async engine too; ragkit never uses it, so it is created without connecting."""
    from sqlalchemy.ext.asyncio import create_async_engine

    return create_async_engine(connection.replace("postgresql+psycopg2", "postgresql+asyncpg", 1).split("?")[0])
