"""ragkit's vector store: FaissVectorStore (LlamaIndex, FAISS) and the crash-safe IndexDirectory.

Names are imported lazily: the index directory alone (``ragkit info``) needs neither FAISS nor LlamaIndex.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "FaissVectorStore": "ragkit.store.faiss_store",
    "build_faiss_index": "ragkit.store.faiss_store",
    "IndexDirectory": "ragkit.store.index_dir",
    "Snapshot": "ragkit.store.index_dir",
    "SnapshotWriter": "ragkit.store.index_dir",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from ragkit.store.faiss_store import FaissVectorStore, build_faiss_index  # noqa: F401
    from ragkit.store.index_dir import IndexDirectory, Snapshot, SnapshotWriter  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ragkit.store' has no attribute {name!r}")
