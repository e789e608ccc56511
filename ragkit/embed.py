"""``SentenceTransformerEmbedding``: a LlamaIndex embedding model over sentence-transformers.

Embeddings are L2-normalized, so inner product equals cosine similarity (the FAISS store relies on it).
``model_name`` is a stable id (``sentence-transformers/all-MiniLM-L6-v2`` for ``"default"``), never a
local path, so that an index built on one machine opens on another with the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from pydantic import PrivateAttr

from ragkit.errors import ModelLoadError


DEFAULT_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def _resolve(model_name: str) -> tuple[Path, str]:
    """Local location and stable name: the hub id for the default model and hub ids, else the folder name."""
    from ragkit import models

    source = models.resolve_embedder(model_name)
    if source.path.resolve() == models.default_embedder_path().resolve():
        return source.path, DEFAULT_NAME
    if Path(model_name).expanduser().exists():
        return source.path, source.path.name
    return source.path, model_name


class SentenceTransformerEmbedding(BaseEmbedding):
    """Sentence-transformers encoder as a LlamaIndex ``BaseEmbedding``.

    ``model_name`` is ``"default"`` (the embedded all-MiniLM-L6-v2), a local model directory or a
    hub id available offline. ``encode_batch_size`` is the batch handed to the encoder inside one call;
    ``embed_batch_size`` (LlamaIndex's) is how many texts one call receives: keep it large so that
    sentence-transformers can sort texts by length and pad little.
    """

    encode_batch_size: int = 32
    device: str | None = None
    _model: Any = PrivateAttr()

    def __init__(
        self,
        model_name: str = "default",
        *,
        device: str | None = None,
        encode_batch_size: int = 32,
        embed_batch_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        location, stable_name = _resolve(model_name)
        super().__init__(
            model_name=stable_name,
            embed_batch_size=embed_batch_size,
            encode_batch_size=encode_batch_size,
            device=device,
            **kwargs,
        )
        from sentence_transformers import SentenceTransformer

        try:
            self._model = SentenceTransformer(str(location), device=device or "cpu", local_files_only=True)
        except Exception as exc:  # corrupt or unsupported files: say which model
            raise ModelLoadError(
                f"Could not load the embedding model {model_name!r} from {location}: {exc}. "
                "Check that the directory holds a complete sentence-transformers model."
            ) from exc

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
        """The encoder's own (fast) tokenizer: chunking counts tokens with it."""
        return self._model.tokenizer

    @property
    def model(self) -> Any:
        """The underlying ``SentenceTransformer``."""
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
