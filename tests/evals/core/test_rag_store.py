"""Suites' rag cells on a real pgvector server: the same chunks in the same ranks as FAISS flat."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("llama_index.vector_stores.postgres")

from evals.needle.suite import NeedleSettings  # noqa: E402
from evals.core.targets import Retriever  # noqa: E402

SQLITE = Path(__file__).resolve().parents[3] / "corpora" / "sqlite"


def test_a_cells_retrieval_on_pgvector_ranks_like_faiss_flat(pg_url, tmp_path):
    text = (SQLITE / "lockingv3.txt").read_text() + "\nThe secret passcode is 48213.\n" + \
        (SQLITE / "lang_vacuum.txt").read_text()
    question = "What is the secret passcode?"
    faiss = Retriever(64, 8).top_chunks(tmp_path / "faiss-cell", text, question)
    retriever = Retriever(64, 8, store=pg_url)
    pg = retriever.top_chunks(tmp_path / "pg-cell", text, question)
    assert pg == faiss and "48213" in pg[0]
    assert retriever.top_chunks(tmp_path / "pg-cell", text, question) == pg  # a resumed cell finds its table


def test_store_is_hashed_only_when_set():
    plain = NeedleSettings(lengths=(1024,), mode="rag")
    assert "store" not in plain.hashed()
    assert NeedleSettings(lengths=(1024,), mode="rag", store="postgresql://h/db").hashed()["store"] == "postgresql://h/db"
