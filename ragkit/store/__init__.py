"""ragkit's vector store: FaissVectorStore (LlamaIndex, FAISS) and the crash-safe IndexDirectory.

Names are imported lazily: the index directory alone (``ragkit info``) needs neither FAISS nor LlamaIndex.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ragkit.lazy import lazy_exports

__all__ = ["FaissVectorStore", "IndexDirectory", "Snapshot", "SnapshotWriter", "build_faiss_index"]
__getattr__ = lazy_exports(__name__, {
    "FaissVectorStore": "ragkit.store.faiss_store", "build_faiss_index": "ragkit.store.faiss_store",
    "IndexDirectory": "ragkit.store.index_dir", "Snapshot": "ragkit.store.index_dir",
    "SnapshotWriter": "ragkit.store.index_dir",
})

if TYPE_CHECKING:  # pragma: no cover
    from ragkit.store.faiss_store import FaissVectorStore, build_faiss_index
    from ragkit.store.index_dir import IndexDirectory, Snapshot, SnapshotWriter
