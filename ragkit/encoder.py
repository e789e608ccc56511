"""Plain sentence encoders (BERT + mean/CLS pooling), run on torch alone: bit-identical to sentence-transformers.

A sentence-transformers directory whose modules are a BERT ``Transformer``, mean or CLS ``Pooling`` and
an optional ``Normalize`` (all-MiniLM-L6-v2, ragkit's default, is one) is encoded here exactly as
``SentenceTransformer.encode`` does it with transformers' ``BertModel`` (same length-sorted batches, the
same tokenizer settings, the same BERT operations in the same order -- SDPA attention with the boolean
padding mask transformers builds, or none when nothing is padded --, the same pooling and
normalizations), so its vectors equal the package's bit for bit (tests/ragkit/test_encoder.py).
It needs only torch, ``tokenizers`` and ``safetensors``: importing sentence-transformers (scikit-learn,
PEFT, bitsandbytes, torch's compiler) or even transformers' modeling code (torch.distributed, dynamo)
cost ``ragkit retrieve`` 5 of its 10 CPU seconds. Any other layout (prompts, lower-casing, other
poolings, architectures or weight formats, extra modules) is loaded by sentence-transformers itself.
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
# the BertModel configurations whose forward is the one below (absolute positions, exact GELU, encoder only)
_BERT = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
_WEIGHTS = "model.safetensors"


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def plain_layout(location: Path) -> dict[str, Any] | None:
    """What :class:`PlainEncoder` needs to encode ``location`` exactly; None when it is not a plain encoder."""
    try:
        modules = json.loads((location / "modules.json").read_text(encoding="utf-8"))
        types = [m["type"] for m in modules]
        if types not in ([_TRANSFORMER, _POOLING], [_TRANSFORMER, _POOLING, _NORMALIZE]) or modules[0]["path"] != "":
            return None
        pooling = _json(location / modules[1]["path"] / "config.json")
        settings = _json(location / "sentence_bert_config.json")
        st_config = _json(location / "config_sentence_transformers.json")
        config = _json(location / "config.json")
        tokenizer_config = {**_json(location / "special_tokens_map.json"), **_json(location / "tokenizer_config.json")}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # sentence-transformers says what is wrong with it
    modes = [mode for key, mode in _POOLING_MODES.items() if pooling.get(key)]
    pad = tokenizer_config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    plain = (len(modes) == 1 and not any(pooling.get(key) for key in _OTHER_POOLING_MODES)
             and pooling.get("include_prompt", True) and set(settings) <= {"max_seq_length", "do_lower_case"}
             and not settings.get("do_lower_case") and not st_config.get("prompts")
             and not st_config.get("default_prompt_name")
             and all(config.get(key, "absolute" if key == "position_embedding_type" else None) == value
                     for key, value in _BERT.items())
             and not config.get("is_decoder") and not config.get("chunk_size_feed_forward")
             and config.get("torch_dtype", config.get("dtype", "float32")) in ("float32", None)
             and isinstance(pad, str) and (location / "tokenizer.json").is_file() and (location / _WEIGHTS).is_file())
    if not plain:
        return None
    limit = min(int(settings.get("max_seq_length") or config["max_position_embeddings"]),
                int(config["max_position_embeddings"]))
    return {"pooling": modes[0], "normalize": len(types) == 3, "max_seq_length": limit, "pad_token": pad,
            "dimension": int(pooling.get("word_embedding_dimension") or config["hidden_size"]), "config": config}


def load_encoder(location: Path, device: str) -> Any:
    """A :class:`PlainEncoder` for a plain sentence encoder, else a ``SentenceTransformer``."""
    layout = plain_layout(location)
    if layout is None:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(location), device=device, local_files_only=True)
    return PlainEncoder(location, layout, device)


class PlainEncoder:
    """The part of ``SentenceTransformer`` that ragkit uses (``encode``, ``tokenizer``, ``max_seq_length``,
    ``get_embedding_dimension``) for a plain BERT sentence encoder.

    ``fast_tokenizer`` is the Rust tokenizer (loaded at once); ``tokenizer`` the transformers one, loaded
    at first use (it costs more than a second of CPU, and encoding does not need it).
    """

    def __init__(self, location: Path, layout: dict[str, Any], device: str):
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self.location, self.device = location, torch.device(device)
        self.max_seq_length: int = layout["max_seq_length"]
        self.pooling, self.normalize, self._dimension = layout["pooling"], layout["normalize"], layout["dimension"]
        config = layout["config"]
        self._heads, self._eps = int(config["num_attention_heads"]), float(config["layer_norm_eps"])
        self._layers = int(config["num_hidden_layers"])
        self.fast_tokenizer = Tokenizer.from_file(str(location / "tokenizer.json"))
        pad = layout["pad_token"]
        self.fast_tokenizer.enable_truncation(self.max_seq_length, stride=0, strategy="longest_first",
                                              direction="right")
        self.fast_tokenizer.enable_padding(direction="right", pad_id=self.fast_tokenizer.token_to_id(pad),
                                           pad_type_id=0, pad_token=pad)
        weights = load_file(str(location / _WEIGHTS), device=str(self.device))
        self._w = {name.removeprefix("bert."): tensor for name, tensor in weights.items()}
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The transformers (fast) tokenizer of the model, as sentence-transformers configures it."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.location, local_files_only=True,
                                                            model_max_length=self.max_seq_length)
        return self._tokenizer

    def get_embedding_dimension(self) -> int:
        return self._dimension

    def _bert(self, ids: Any, types: Any, mask: Any) -> Any:
        """``BertModel(...).last_hidden_state``, operation for operation as transformers computes it (eval mode)."""
        import torch
        from torch.nn import functional as F

        w, eps = self._w, self._eps
        batch, length = ids.shape

        def norm(x: Any, name: str) -> Any:
            return F.layer_norm(x, (x.shape[-1],), w[f"{name}.LayerNorm.weight"], w[f"{name}.LayerNorm.bias"], eps)

        def linear(x: Any, name: str) -> Any:
            return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])

        hidden = F.embedding(ids, w["embeddings.word_embeddings.weight"])
        hidden = hidden + F.embedding(types, w["embeddings.token_type_embeddings.weight"])
        positions = torch.arange(length, device=ids.device).unsqueeze(0)
        hidden = norm(hidden + F.embedding(positions, w["embeddings.position_embeddings.weight"]), "embeddings")
        # transformers passes no mask when nothing is padded, else a boolean (batch, 1, query, key) one
        attend = None if bool(mask.all()) else mask.bool()[:, None, None, :].expand(batch, 1, length, length).contiguous()
        head_size = hidden.shape[-1] // self._heads
        for i in range(self._layers):
            layer = f"encoder.layer.{i}"
            q, k, v = (linear(hidden, f"{layer}.attention.self.{n}").view(batch, length, -1, head_size).transpose(1, 2)
                       for n in ("query", "key", "value"))
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=0.0,
                                                     scale=head_size ** -0.5, is_causal=False)
            context = context.reshape(batch, -1, length, head_size).transpose(1, 2).contiguous()
            context = context.reshape(batch, length, -1).contiguous()
            attended = norm(linear(context, f"{layer}.attention.output.dense") + hidden, f"{layer}.attention.output")
            inner = F.gelu(linear(attended, f"{layer}.intermediate.dense"))
            hidden = norm(linear(inner, f"{layer}.output.dense") + attended, f"{layer}.output")
        return hidden

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
                encodings = self.fast_tokenizer.encode_batch([texts[i] for i in order[start:start + batch_size]])
                ids, types, mask = (torch.tensor([getattr(e, field) for e in encodings], dtype=torch.long,
                                                 device=self.device)
                                    for field in ("ids", "type_ids", "attention_mask"))
                hidden = self._bert(ids, types, mask)
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
