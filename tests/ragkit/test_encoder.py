"""PlainEncoder: MiniLM on transformers alone gives sentence-transformers' vectors bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ragkit.embed import SentenceTransformerEmbedding
from ragkit.encoder import PlainEncoder, load_encoder, plain_layout
from ragkit.models import default_embedder_path

ROOT = Path(__file__).resolve().parents[2]


def _texts() -> list[str]:
    """Queries and chunks of every length: one word, sentences, more than 256 tokens, non-ASCII, empty."""
    sqlite = (ROOT / "corpora" / "sqlite" / "lockingv3.txt").read_text(encoding="utf-8")
    words = sqlite.split()
    texts = [" ".join(words[i:i + n]) for i, n in zip(range(0, 4000, 97), [1, 3, 9, 30, 80, 200, 400] * 6)]
    return texts + ["What is a hot journal?", "Café “quoted” — 東京 €", "", "x" * 3000]


def _copy(dst: Path, *, pooling: str = "mean", st_config: dict | None = None) -> Path:
    """The embedded MiniLM in ``dst`` (weights linked), with another pooling or sentence-transformers config."""
    src = default_embedder_path()
    for f in src.rglob("*"):
        if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, target)
    pooling_cfg = dst / "1_Pooling" / "config.json"
    cfg = json.loads(pooling_cfg.read_text())
    cfg.update(pooling_mode_mean_tokens=pooling == "mean", pooling_mode_cls_token=pooling == "cls",
               pooling_mode_max_tokens=pooling == "max")
    pooling_cfg.write_text(json.dumps(cfg))
    if st_config is not None:
        (dst / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    return dst


def _sentence_transformers(location: Path):  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(location), device="cpu", local_files_only=True)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_vectors_equal_sentence_transformers_bit_for_bit(tmp_path, pooling):
    location = default_embedder_path() if pooling == "mean" else _copy(tmp_path / "m", pooling="cls")
    plain, reference = load_encoder(location, "cpu"), _sentence_transformers(location)
    assert isinstance(plain, PlainEncoder)
    assert plain.max_seq_length == reference.max_seq_length == 256
    assert plain.get_embedding_dimension() == reference.get_embedding_dimension() == 384
    texts = _texts()
    for batch_size in (32, 7):  # batches mix lengths (padding) differently
        for normalize in (True, False):
            ours = plain.encode(texts, batch_size=batch_size, normalize_embeddings=normalize)
            theirs = reference.encode(texts, batch_size=batch_size, normalize_embeddings=normalize,
                                      convert_to_numpy=True, show_progress_bar=False)
            assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape == (len(texts), 384)
            assert np.array_equal(ours, theirs), f"batch_size={batch_size} normalize={normalize}"
    one = plain.encode(["What is a hot journal?"], normalize_embeddings=True)
    assert np.array_equal(one, reference.encode(["What is a hot journal?"], normalize_embeddings=True))
    assert plain.encode([]).shape == (0,)


def test_embedding_model_uses_the_plain_encoder_and_the_index_vectors_match(embedder):
    """What ragkit stores at ingest and searches with at retrieve is sentence-transformers' vector."""
    assert isinstance(embedder.model, PlainEncoder)
    reference = _sentence_transformers(default_embedder_path())
    texts = _texts()
    stored = np.array(embedder.get_text_embedding_batch(texts), dtype=np.float32)
    assert np.array_equal(stored, reference.encode(texts, batch_size=32, normalize_embeddings=True))
    query = np.array(embedder.get_query_embedding("What is a hot journal?"), dtype=np.float32)
    assert np.array_equal(query, reference.encode(["What is a hot journal?"], normalize_embeddings=True)[0])


@pytest.mark.parametrize("change", ["max pooling", "prompts", "lower-casing", "no modules.json"])
def test_other_layouts_are_left_to_sentence_transformers(tmp_path, change):
    location = _copy(tmp_path / "m", pooling="max" if change == "max pooling" else "mean",
                     st_config={"prompts": {"query": "query: "}} if change == "prompts" else None)
    if change == "lower-casing":
        (location / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": True}))
    if change == "no modules.json":
        (location / "modules.json").unlink()
    assert plain_layout(location) is None
    assert not isinstance(SentenceTransformerEmbedding(str(location)).model, PlainEncoder)


def test_fast_tokenizer_is_the_transformers_tokenizers_backend():
    """Chunking counts with ``fast_tokenizer``; it tokenizes as the transformers tokenizer (loaded lazily) does."""
    from tokenizers import Tokenizer

    embedder = SentenceTransformerEmbedding("default")
    assert embedder.model._tokenizer is None, "building the embedder must not load the transformers tokenizer"
    counter = Tokenizer.from_str(embedder.fast_tokenizer.to_str())
    counter.no_truncation()
    counter.no_padding()
    texts = _texts()
    assert [e.ids for e in counter.encode_batch(texts)] == embedder.tokenizer(texts, truncation=False)["input_ids"]
    assert embedder.tokenizer.is_fast and embedder.tokenizer.model_max_length == 256
