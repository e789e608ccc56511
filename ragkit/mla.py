"""Decode steps of multi-head latent attention (Mistral-4, DeepSeek-V2/V3) on the compressed cache.

transformers' MLA caches the compressed latent ``c`` (``kv_lora_rank`` per token, after ``kv_a_layernorm``) and
the shared rotary key ``k_rot``, but expands them through ``kv_b_proj`` into per-head keys and values for the
whole cache on every step: at a 256k-token cache that is ~0.8 TFLOP per layer per generated token, on a step whose
real work is a few GFLOP. MLA is meant to be computed with that projection absorbed: with
``kv_b_proj = [W_uk; W_uv]`` per head,

    score(q, j) = q_nope . (W_uk c_j) + q_rot . k_rot_j = (W_uk^T q_nope) . c_j + q_rot . k_rot_j
    out(q)      = W_uv (sum_j p_j c_j)

so one step reads the latent cache once and never materializes per-head keys. :func:`absorb` makes a model's
attention modules hand the latents to the attention function (``expand_kv`` becomes the identity); the attention
function (:mod:`ragkit.attention`) then calls :func:`attend` for single-token queries and expands as before for
longer query blocks (prefill), where the expanded form costs fewer FLOPs.
"""

from __future__ import annotations

from typing import Any

import torch


def absorb(model: Any) -> int:
    """Make every MLA module of ``model`` pass its latent cache to the attention function; returns how many.

    The model must use :data:`ragkit.attention.NAME` as its attention implementation (which then expands or
    absorbs); :func:`ragkit.attention.use_lower_right` does both.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "kv_b_proj") and hasattr(module, "expand_kv") and not is_absorbed(module):
            module.ragkit_expand_kv = module.expand_kv
            module.expand_kv = _latents
            n += 1
    return n


def is_absorbed(module: torch.nn.Module) -> bool:
    return hasattr(module, "ragkit_expand_kv")


def _latents(latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return latent, k_rot


def attend(module: torch.nn.Module, query: torch.Tensor, latent: torch.Tensor, k_rot: torch.Tensor,
           attention_mask: torch.Tensor | None, scaling: float) -> tuple[torch.Tensor, None]:
    """One decode step: ``query [b, h, 1, nope + rope]`` on ``latent [b, 1, S, rank]`` and ``k_rot [b, 1, S, rope]``;
    returns ``[b, 1, h, v_head_dim]`` like transformers' attention functions. ``attention_mask``: None (every cached
    position) or the boolean ``[b, 1, 1, S]`` mask of a padded batch."""
    nope = module.qk_nope_head_dim
    w_uk, w_uv = _absorbed_weights(module, query.dtype)
    q_lat = torch.einsum("bhqn,hnr->bhqr", query[..., :nope], w_uk).transpose(1, 2)  # [b, 1, h, rank]
    q_rot = query[..., nope:].transpose(1, 2)  # [b, 1, h, rope]
    scores = (q_lat @ latent.transpose(-1, -2) + q_rot @ k_rot.transpose(-1, -2)).float() * scaling  # [b, 1, h, S]
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(latent.dtype)
    out_lat = probs @ latent  # [b, 1, h, rank]
    return torch.einsum("bqhr,hvr->bqhv", out_lat, w_uv), None


def _absorbed_weights(module: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_uk [h, nope, rank]`` and ``W_uv [h, v, rank]`` from ``kv_b_proj`` (dequantized once if it is NF4)."""
    cached = getattr(module, "ragkit_absorbed", None)
    if cached is not None and cached[0].dtype == dtype:
        return cached
    weight = module.kv_b_proj.weight
    if hasattr(weight, "quant_state"):  # a bitsandbytes 4-bit weight
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    heads = module.config.num_attention_heads
    w = weight.to(dtype).view(heads, module.qk_nope_head_dim + module.v_head_dim, module.kv_lora_rank)
    module.ragkit_absorbed = (w[:, :module.qk_nope_head_dim].contiguous(), w[:, module.qk_nope_head_dim:].contiguous())
    return module.ragkit_absorbed
