"""ragkit's vector store: FaissVectorStore (LlamaIndex, FAISS) and the crash-safe IndexDirectory."""

from ragkit.store.faiss_store import FaissVectorStore, build_faiss_index
from ragkit.store.index_dir import IndexDirectory, Snapshot, SnapshotWriter

__all__ = ["FaissVectorStore", "IndexDirectory", "Snapshot", "SnapshotWriter", "build_faiss_index"]
