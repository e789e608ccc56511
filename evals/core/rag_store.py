"""Where a suite's rag cells keep their chunks: a FAISS index directory (default) or a server-backed store.

With ``--store postgresql://...`` each index the suite would have made under ``index_dir`` becomes its
own table on that server, named by a hash of the directory's path, so reruns and resumes find it again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import ragkit


def table_url(store: str, index_dir: Path, prefix: str) -> str:
    """``store`` with ``table=<prefix>_<hash of index_dir>`` added."""
    table = f"{prefix}_{hashlib.sha1(str(index_dir.resolve()).encode()).hexdigest()[:16]}"
    return f"{store}{'&' if '?' in store else '?'}table={table}"


def open_pipeline(index_dir: Path, store: str | None, prefix: str, **kwargs: Any) -> Any:
    """``ragkit.Pipeline`` on ``index_dir`` (FAISS) or, with ``store``, on its table of that server."""
    if store is None:
        return ragkit.Pipeline(index_dir, **kwargs)
    return ragkit.Pipeline(vector_store=table_url(store, index_dir, prefix), **kwargs)
