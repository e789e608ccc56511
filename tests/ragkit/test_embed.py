"""SentenceTransformerEmbedding: identity recorded in indexes, normalized vectors, batching, errors."""

from __future__ import annotations

import numpy as np
import pytest

from ragkit.embed import DEFAULT_NAME, SentenceTransformerEmbedding
from ragkit.errors import ModelNotFoundError


def test_default_model_identity(embedder):
    assert embedder.model_name == DEFAULT_NAME == "sentence-transformers/all-MiniLM-L6-v2"
    assert embedder.dimension == 384
    assert embedder.max_seq_length == 256
    assert embedder.tokenizer.is_fast


def test_embeddings_are_normalized_and_batch_equals_single(embedder):
    texts = ["SQLite uses a rollback journal.", "Python lists are mutable sequences.", "x"]
    batch = np.array(embedder.get_text_embedding_batch(texts))
    assert batch.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    single = np.array(embedder.get_text_embedding(texts[1]))
    np.testing.assert_allclose(single, batch[1], atol=1e-5)


def test_related_text_scores_higher(embedder):
    q = np.array(embedder.get_query_embedding("How does SQLite recover after a crash?"))
    related = np.array(embedder.get_text_embedding("A hot journal is rolled back to restore the database after a power failure."))
    unrelated = np.array(embedder.get_text_embedding("List comprehensions create lists from iterables in Python."))
    assert q @ related > q @ unrelated + 0.1


def test_unknown_model_says_where_it_looked(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found offline"):
        SentenceTransformerEmbedding(str(tmp_path / "no-such-model"))
