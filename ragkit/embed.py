"""``SentenceTransformerEmbedding``: a LlamaIndex embedding model over sentence-transformers models.

Plain encoders (MiniLM's layout) run on transformers alone, bit-identical to sentence-transformers
(:mod:`ragkit.encoder`); others are loaded by the sentence-transformers package.

Embeddings are L2-normalized, so inner product equals cosine similarity (the FAISS store relies on it).
``model_name`` is a stable display id (``sentence-transformers/all-MiniLM-L6-v2`` for ``"default"``).
The embedder's *identity* is its content: :attr:`SentenceTransformerEmbedding.fingerprint` hashes every
file the encoder loads (weights, pooling and normalization modules, tokenizer, configs) together with
the settings ragkit applies (``max_seq_length``, normalization), so two models stored in folders of the
same name, or the same weights with another pooling, never share an index. :attr:`source` is what to
pass to load it again (``"default"``, an absolute directory, or a hub id); indexes record both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from pydantic import PrivateAttr

from ragkit.errors import ModelLoadError


DEFAULT_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# files in a model directory that the encoder never reads (docs, git metadata, other runtimes' weights)
_UNUSED_DIRS = {"onnx", "openvino"}
_CACHE_HASHES_OVER = 1 << 24  # bytes


def _resolve(model_name: str) -> tuple[Path, str, str]:
    """Local location, stable name and source (what reloads it: 'default', an absolute dir or a hub id)."""
    from ragkit import models

    found = models.resolve_embedder(model_name)
    if found.path.resolve() == models.default_embedder_path().resolve():
        return found.path, DEFAULT_NAME, "default"
    if Path(model_name).expanduser().exists():
        return found.path, found.path.name, str(found.path.resolve())
    return found.path, model_name, model_name


def content_fingerprint(model_dir: Path, settings: dict[str, Any]) -> str:
    """sha256 over the content of every file the encoder loads from ``model_dir`` plus ``settings``."""
    root = model_dir.resolve()
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if rel.parts[0] in _UNUSED_DIRS or any(part.startswith(".") for part in rel.parts) \
                or path.name.upper().startswith("README"):
            continue
        files[rel.as_posix()] = _file_sha256(path)
    return hashlib.sha256(json.dumps({"files": files, "settings": settings}, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    """sha256 of a file; large files' hashes are cached by path, size and mtime (weights are ~100 MB)."""
    from ragkit.models import cache_dir

    stat = path.stat()
    if stat.st_size < _CACHE_HASHES_OVER:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = cache_dir() / "file-sha256" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".txt")
    with contextlib.suppress(OSError):
        cached = cache.read_text().strip()
        if len(cached) == 64:
            return cached
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    with contextlib.suppress(OSError):  # an unwritable cache only costs the hashing next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(h.hexdigest())
        os.replace(tmp, cache)
    return h.hexdigest()


class SentenceTransformerEmbedding(BaseEmbedding):
    """Sentence-transformers encoder as a LlamaIndex ``BaseEmbedding``.

    ``model_name`` is ``"default"`` (the embedded all-MiniLM-L6-v2), a local model directory or a
    hub id available offline. ``encode_batch_size`` is the batch handed to the encoder inside one call;
    ``embed_batch_size`` (LlamaIndex's) is how many texts one call receives: keep it large so that
    sentence-transformers can sort texts by length and pad little.
    """

    encode_batch_size: int = 32
    device: str | None = None
    source: str = ""
    _model: Any = PrivateAttr()
    _location: Path = PrivateAttr()
    _fingerprint: str | None = PrivateAttr(default=None)

    def __init__(
        self,
        model_name: str = "default",
        *,
        device: str | None = None,
        encode_batch_size: int = 32,
        embed_batch_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        location, stable_name, source = _resolve(model_name)
        super().__init__(
            model_name=stable_name,
            source=source,
            embed_batch_size=embed_batch_size,
            encode_batch_size=encode_batch_size,
            device=device,
            **kwargs,
        )
        from ragkit.encoder import load_encoder

        try:
            self._model = load_encoder(location, device or "cpu")
        except Exception as exc:  # corrupt or unsupported files: say which model
            raise ModelLoadError(
                f"Could not load the embedding model {model_name!r} from {location}: {exc}. "
                "Check that the directory holds a complete sentence-transformers model."
            ) from exc
        self._location = location

    @property
    def fingerprint(self) -> str:
        """Content identity: sha256 of the model files and of the settings ragkit encodes with."""
        if self._fingerprint is None:
            self._fingerprint = content_fingerprint(
                self._location, {"max_seq_length": self.max_seq_length, "normalize_embeddings": True})
        return self._fingerprint

    @property
    def identity(self) -> dict[str, Any]:
        """What an index records about its embedder: name, source, dimension, fingerprint."""
        return {"name": self.model_name, "source": self.source, "dimension": self.dimension,
                "max_seq_length": self.max_seq_length, "fingerprint": self.fingerprint}

    @classmethod
    def class_name(cls) -> str:
        return "SentenceTransformerEmbedding"

    @property
    def dimension(self) -> int:
        """Length of each embedding vector."""
        model = self._model
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    @property
    def max_seq_length(self) -> int:
        """Most tokens the encoder reads, special tokens included; longer inputs would be truncated."""
        return int(self._model.max_seq_length)

    @property
    def tokenizer(self) -> Any:
        """The encoder's transformers tokenizer (fast; loaded at first use for plain encoders)."""
        return self._model.tokenizer

    @property
    def fast_tokenizer(self) -> Any:
        """The encoder's Rust ``tokenizers.Tokenizer``: chunking counts tokens with it."""
        return getattr(self._model, "fast_tokenizer", None) or self._model.tokenizer.backend_tokenizer

    @property
    def model(self) -> Any:
        """The underlying encoder: a :class:`~ragkit.encoder.PlainEncoder` (MiniLM and other plain sentence
        encoders, without importing sentence-transformers) or a ``SentenceTransformer``."""
        return self._model

    def encode(self, texts: list[str]) -> Any:
        """Normalized embeddings of ``texts`` as a float32 numpy array of shape (len(texts), dimension)."""
        return self._model.encode(
            texts,
            batch_size=self.encode_batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    def _get_query_embedding(self, query: str) -> list[float]:
        return self.encode([query])[0].tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self.encode([text])[0].tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self.encode(texts).tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embedding(text)
