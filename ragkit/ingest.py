"""Ingestion: files (or LlamaIndex documents) -> chunks -> embeddings -> vector store, deduplicated.

Runs on LlamaIndex's ``IngestionPipeline`` with a docstore of document hashes and
``DocstoreStrategy.UPSERTS``: an unchanged document embeds nothing, a changed one has its old chunks
deleted from the vector store before its new ones are added. Each file becomes one or more documents
(*parts*, see :mod:`ragkit.readers`): the first part's id is the file's absolute path, later parts are
``PATH#partN``. A registry ``source -> [doc ids]`` lets :meth:`Ingestor.delete` remove a whole file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
from llama_index.core.schema import Document
from llama_index.core.storage.docstore import SimpleDocumentStore
from llama_index.core.vector_stores.types import BasePydanticVectorStore
from ragkit.chunking import TokenSentenceSplitter
from ragkit.errors import IngestError
from ragkit.progress import progress_bar
from ragkit.readers import DEFAULT_PART_CHARS, Skipped, SkipFile, discover, read_parts

BATCH_CHARS = 1 << 16  # text handed to one IngestionPipeline.run (about 60 chunks, a few seconds on 2 cores)


@dataclass
class IngestSummary:
    """What one ``ingest`` call did. Paths are absolute; documents passed in are named by their id."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # indexed before, now gone/empty/unreadable: chunks deleted
    skipped: list[Skipped] = field(default_factory=list)
    chunks_embedded: int = 0
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)

    def __str__(self) -> str:
        lines = [
            f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
            f"{len(self.removed)} removed, {len(self.skipped)} skipped; "
            f"{self.chunks_embedded} chunks embedded in {self.seconds:.1f} s"
        ]
        lines += [f"  skipped {s.path}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def part_doc_id(source: str, part: int) -> str:
    """Id of a file's part: the path itself for the first part, ``PATH#partN`` for the others."""
    return source if part == 0 else f"{source}#part{part}"


class Ingestor:
    """Chunker + embedder in an ``IngestionPipeline`` over ``vector_store``, with hashes in ``docstore``."""

    def __init__(
        self,
        embed_model: Any,
        vector_store: BasePydanticVectorStore,
        *,
        docstore: SimpleDocumentStore | None = None,
        sources: dict[str, list[str]] | None = None,
        chunk_tokens: int | None = None,
        part_chars: int = DEFAULT_PART_CHARS,
    ):
        # the Rust tokenizer where the embedder has one (a plain encoder then loads no transformers tokenizer)
        tokenizer = getattr(embed_model, "fast_tokenizer", None) or getattr(embed_model, "tokenizer", None)
        for attr, value in (("tokenizer", tokenizer), ("max_seq_length", getattr(embed_model, "max_seq_length", None))):
            if value is None:
                raise IngestError(
                    f"the embed_model {type(embed_model).__name__} has no .{attr}; token-aware chunking needs the "
                    f"embedder's tokenizer and max_seq_length (use ragkit.embed.SentenceTransformerEmbedding)"
                )
        self.splitter = TokenSentenceSplitter(tokenizer, embed_model.max_seq_length, chunk_tokens)
        self.pipeline = IngestionPipeline(
            transformations=[self.splitter, embed_model],
            vector_store=vector_store,
            docstore=docstore if docstore is not None else SimpleDocumentStore(),
            docstore_strategy=DocstoreStrategy.UPSERTS,
            disable_cache=True,  # the cache would keep every embedded node in memory
        )
        self.sources: dict[str, list[str]] = sources if sources is not None else {}
        self.part_chars = part_chars

    @property
    def docstore(self) -> SimpleDocumentStore:
        return self.pipeline.docstore

    @property
    def vector_store(self) -> BasePydanticVectorStore:
        return self.pipeline.vector_store

    # ---- ingesting --------------------------------------------------------------------------------
    def ingest(self, inputs: Iterable[str | os.PathLike[str] | Document], show_progress: bool = True, *,
               sync: bool = True, checkpoint: Callable[[], None] | None = None,
               checkpoint_seconds: float = 60.0) -> IngestSummary:
        """Ingest files, directories and ``Document`` s; raises :class:`IngestError` for a missing path
        before anything is changed.

        ``sync``: a directory given is a source set: files indexed under it earlier that are gone (or
        no longer readable as text) have their chunks deleted and are counted as removed.
        ``checkpoint``: called at the first file boundary after each ``checkpoint_seconds`` (and at the
        end) when something changed, with every file so far embedded and registered: the caller
        commits there, so a killed ingest loses at most one step.
        """
        started = last_step = time.perf_counter()
        summary = IngestSummary()
        items = [inputs] if isinstance(inputs, (str, os.PathLike, Document)) else list(inputs)
        paths = [x for x in items if not isinstance(x, Document)]
        documents = [x for x in items if isinstance(x, Document)]
        files, summary.skipped = discover(paths)
        gone = self._gone(paths, files) if sync else []
        total = sum(_size(f) for f in files) + sum(len(d.text) for d in documents)
        batch: list[Document] = []
        batch_chars = 0
        dirty = False

        def flush() -> None:
            nonlocal batch, batch_chars
            if batch:
                summary.chunks_embedded += self._run(batch)
                bar.set_postfix(chunks=summary.chunks_embedded, refresh=False)
            batch, batch_chars = [], 0

        with progress_bar(total, "ingest", disable=not show_progress) as bar:
            for source, parts, size in self._sources(files, documents, summary):
                new_ids = []
                status = "unchanged"
                try:
                    for doc in parts:
                        new_ids.append(doc.id_)
                        if self.docstore.get_document_hash(doc.id_) != doc.hash:
                            status = "updated"
                            batch.append(doc)
                            batch_chars += len(doc.text)
                            if batch_chars >= BATCH_CHARS:
                                flush()
                except (SkipFile, OSError) as exc:
                    reason = str(exc) if isinstance(exc, SkipFile) else f"cannot read ({exc})"
                    summary.skipped.append(Skipped(source, reason))
                    batch = [d for d in batch if d.id_ not in new_ids]
                    self._delete_ids(new_ids)  # parts of this file already embedded in an earlier batch
                    if source in self.sources:
                        self._delete_ids(self.sources.pop(source))
                        summary.removed.append(source)
                        dirty = True
                    bar.update(size)
                    continue
                stale = [d for d in self.sources.get(source, []) if d not in new_ids]
                self._delete_ids(stale)
                if status == "updated" or stale:
                    status = "added" if source not in self.sources else "updated"
                    dirty = True
                getattr(summary, status).append(source)
                self.sources[source] = new_ids
                bar.update(size)
                if checkpoint is not None and dirty and time.perf_counter() - last_step >= checkpoint_seconds:
                    flush()
                    checkpoint()
                    dirty, last_step = False, time.perf_counter()
            flush()
            for source in gone:
                self._delete_ids(self.sources.pop(source))
                summary.removed.append(source)
                dirty = True
            bar.update(total - bar.n)
        if checkpoint is not None and dirty:
            checkpoint()
        summary.seconds = time.perf_counter() - started
        return summary

    def _gone(self, paths: list[str | os.PathLike[str]], files: list[Path]) -> list[str]:
        """Registered sources under a directory of ``paths`` that are not among ``files`` any more."""
        found = {str(f) for f in files}
        roots = [str(Path(p).resolve()) for p in paths if Path(p).resolve().is_dir()]
        return [s for s in self.sources if s not in found
                and any(s.startswith(root.rstrip(os.sep) + os.sep) for root in roots)]

    def _sources(
        self, files: list[Path], documents: list[Document], summary: IngestSummary
    ) -> Iterator[tuple[str, Iterator[Document], int]]:
        for path in files:
            yield str(path), self._file_parts(path), _size(path)
        for doc in documents:
            if not doc.text.strip():
                summary.skipped.append(Skipped(doc.id_, "empty document"))
                continue
            doc = doc.model_copy()
            doc.metadata.setdefault("file_path", doc.id_)
            yield doc.id_, iter([doc]), len(doc.text)

    def _file_parts(self, path: Path) -> Iterator[Document]:
        source = str(path)
        for i, part in enumerate(read_parts(path, self.part_chars)):
            meta: dict[str, Any] = {"file_path": source, "file_name": path.name, "part": i,
                                    "part_char_start": part.char_start}
            if part.encoding not in ("utf-8", "utf-8-sig"):
                meta["encoding"] = part.encoding
            yield Document(id_=part_doc_id(source, i), text=part.text, metadata=meta)

    def _run(self, batch: list[Document]) -> int:
        nodes = self.pipeline.run(documents=batch, store_doc_text=False, show_progress=False)
        return len(nodes)

    # ---- deleting ---------------------------------------------------------------------------------
    def resolve(self, key: str | os.PathLike[str]) -> tuple[str, list[str]]:
        """The source a user names (a path as typed, an absolute path, a document id) and its doc ids."""
        key = str(key)
        if key in self.sources:
            return key, self.sources[key]
        absolute = str(Path(key).absolute())
        if absolute in self.sources:
            return absolute, self.sources[absolute]
        for source, ids in self.sources.items():
            if key in ids:
                return source, [key]
        raise IngestError(
            f"{key!r} is neither an ingested file nor a document id of this index; "
            f"`ragkit info --index DIR` lists the ingested files."
        )

    def delete(self, key: str | os.PathLike[str]) -> list[str]:
        """Deletes a file's (or one document's) chunks and hashes; returns the deleted document ids."""
        source, ids = self.resolve(key)
        self._delete_ids(ids)
        remaining = [d for d in self.sources[source] if d not in ids]
        if remaining:
            self.sources[source] = remaining
        else:
            del self.sources[source]
        return ids

    def _delete_ids(self, doc_ids: list[str]) -> None:
        for doc_id in doc_ids:
            self.vector_store.delete(doc_id)
            self.docstore.delete_document(doc_id, raise_error=False)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
