"""What an index directory holds, read from its live snapshot alone: no embedder, FAISS or LlamaIndex.

The pipeline's own files in a snapshot are named here, so that ``ragkit info`` (and anything else that
only describes an index) answers in a fraction of a second.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ragkit.store.index_dir import IndexDirectory, Snapshot

INGEST_DOCSTORE_FILE = "ingest_docstore.json"
SOURCES_FILE = "sources.json"
PIPELINE_FILE = "pipeline.json"


def read_settings(snap: Snapshot) -> dict[str, Any]:
    """The pipeline settings a snapshot records (chunk size, chunker, embedder identity)."""
    settings = json.loads(snap.read_bytes(PIPELINE_FILE)) if snap.has(PIPELINE_FILE) else {}
    if isinstance(settings.get("embedder"), str):  # indexes written before embedder identities
        settings["embedder"] = {"name": settings["embedder"]}
    return settings


def read_sources(snap: Snapshot) -> dict[str, list[str]]:
    """The snapshot's file registry: source -> its document ids."""
    return json.loads(snap.read_bytes(SOURCES_FILE)) if snap.has(SOURCES_FILE) else {}


def describe(index_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Embedder, chunk size, counts and files of the index at ``index_dir`` (checksums verified)."""
    directory = IndexDirectory(index_dir)
    directory.current_name()  # IndexNotFoundError with the reason when there is no index

    def read(snap: Snapshot) -> dict[str, Any]:
        settings, sources, meta = read_settings(snap), read_sources(snap), snap.meta
        embedder = {**meta.get("embedder", {}), **settings.get("embedder", {})}
        info: dict[str, Any] = {
            "index_dir": str(directory.path),
            "snapshot": snap.name,
            "embedder": embedder.get("name"),
            "embedder_source": embedder.get("source"),
            "dimension": embedder.get("dimension"),
            "max_seq_length": embedder.get("max_seq_length"),
            "chunk_tokens": settings.get("chunk_tokens"),
            "vector_store": meta.get("external_store", "FaissVectorStore"),
            "sources": len(sources),
            "documents": sum(len(v) for v in sources.values()),
        }
        if "index" in meta:
            info.update(chunks=meta.get("counts", {}).get("nodes"), store_kind=meta["index"].get("kind"))
        info["files"] = sorted(sources)
        return info

    return directory.read(read)
