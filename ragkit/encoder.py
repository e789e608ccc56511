"""Sentence encoders of the plain kind, run on transformers alone: bit-identical to sentence-transformers.

A sentence-transformers directory whose modules are a BERT ``Transformer``, mean or CLS ``Pooling`` and
an optional ``Normalize`` (all-MiniLM-L6-v2, ragkit's default, is one) is encoded here exactly as
``SentenceTransformer.encode`` does it (same length-sorted batches, tokenizer call, forward, pooling and
normalizations, in the same order), so its vectors equal the package's bit for bit
(tests/ragkit/test_encoder.py). Importing ``sentence_transformers`` also imports scikit-learn, PEFT,
bitsandbytes and torch's compiler: about half of what ``ragkit retrieve`` used to spend. Any other layout
(prompts, lower-casing, other poolings or architectures, extra modules) is loaded by sentence-transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_TRANSFORMER, _POOLING, _NORMALIZE = (f"sentence_transformers.models.{name}"
                                      for name in ("Transformer", "Pooling", "Normalize"))
_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_OTHER_POOLING_MODES = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
_ARCHITECTURES = {"bert"}  # model types whose sentence-transformers encode is the plain path below


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def plain_layout(location: Path) -> dict[str, Any] | None:
    """``{"pooling", "normalize", "max_seq_length"}`` when ``location`` is a plain sentence encoder, else None."""
    try:
        modules = json.loads((location / "modules.json").read_text(encoding="utf-8"))
        types = [m["type"] for m in modules]
        if types not in ([_TRANSFORMER, _POOLING], [_TRANSFORMER, _POOLING, _NORMALIZE]) or modules[0]["path"] != "":
            return None
        pooling = _json(location / modules[1]["path"] / "config.json")
        settings = _json(location / "sentence_bert_config.json")
        st_config = _json(location / "config_sentence_transformers.json")
        config = _json(location / "config.json")
    except (OSError, ValueError, KeyError, TypeError):
        return None  # sentence-transformers says what is wrong with it
    modes = [mode for key, mode in _POOLING_MODES.items() if pooling.get(key)]
    plain = (len(modes) == 1 and not any(pooling.get(key) for key in _OTHER_POOLING_MODES)
             and pooling.get("include_prompt", True) and set(settings) <= {"max_seq_length", "do_lower_case"}
             and not settings.get("do_lower_case") and not st_config.get("prompts")
             and not st_config.get("default_prompt_name") and config.get("model_type") in _ARCHITECTURES)
    if not plain:
        return None
    limit = min(int(settings.get("max_seq_length") or config["max_position_embeddings"]),
                int(config["max_position_embeddings"]))
    return {"pooling": modes[0], "normalize": len(types) == 3, "max_seq_length": limit,
            "dimension": int(pooling.get("word_embedding_dimension") or config["hidden_size"])}


def load_encoder(location: Path, device: str) -> Any:
    """A :class:`PlainEncoder` for a plain sentence encoder, else a ``SentenceTransformer``."""
    layout = plain_layout(location)
    if layout is None:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(location), device=device, local_files_only=True)
    return PlainEncoder(location, layout, device)


class PlainEncoder:
    """The subset of ``SentenceTransformer`` ragkit uses (``encode``, ``tokenizer``, ``max_seq_length``,
    ``get_embedding_dimension``) for a plain sentence encoder, on transformers' ``AutoModel``."""

    def __init__(self, location: Path, layout: dict[str, Any], device: str):
        from transformers import AutoModel, AutoTokenizer

        self.max_seq_length = layout["max_seq_length"]
        self.pooling, self.normalize, self._dimension = layout["pooling"], layout["normalize"], layout["dimension"]
        self.tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True,
                                                       model_max_length=self.max_seq_length)
        self.model = AutoModel.from_pretrained(location, local_files_only=True).to(device).eval()
        self.device = device

    def get_embedding_dimension(self) -> int:
        return self._dimension

    def encode(self, texts: list[str], *, batch_size: int = 32, normalize_embeddings: bool = False,
               convert_to_numpy: bool = True, show_progress_bar: bool = False) -> Any:
        """Float32 embeddings of ``texts``, shape (len(texts), dimension): numpy, or a tensor."""
        import numpy as np
        import torch
        from torch.nn import functional as F

        order = np.argsort([-len(text) for text in texts])  # sentence-transformers' batches: longest first
        vectors: list[Any] = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                features = self.tokenizer([texts[i] for i in order[start:start + batch_size]], padding=True,
                                          truncation="longest_first", return_tensors="pt").to(self.device)
                hidden = self.model(**features, return_dict=True).last_hidden_state
                mask = features["attention_mask"]
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    weights = mask.unsqueeze(-1).to(hidden.dtype)
                    total = (hidden * weights).sum(dim=1, dtype=torch.float32)
                    pooled = (total / torch.clamp(weights.sum(dim=1, dtype=torch.float32), min=1e-9)).to(hidden.dtype)
                if self.normalize:  # the Normalize module ...
                    pooled = F.normalize(pooled, p=2, dim=-1)
                if normalize_embeddings:  # ... and encode(normalize_embeddings=True) each normalize once
                    pooled = F.normalize(pooled, p=2, dim=1)
                vectors.extend(pooled.cpu())
        if not vectors:
            return np.array([]) if convert_to_numpy else torch.tensor([])
        stacked = torch.stack([vectors[i] for i in np.argsort(order)])
        return stacked.numpy() if convert_to_numpy else stacked
