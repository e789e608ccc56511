"""Mask-free causal attention for prefill on a cached prefix, registered with transformers' attention interface.

transformers' ``sdpa`` path passes SDPA an explicit boolean mask of query x key positions whenever the query block
is shorter than the keys (a prompt's tail on a cached prefix, a chunk of a chunked prefill). On a GPU that mask
costs memory (a 128k-token tail on a 128k prefix: 16 GiB of booleans) and keeps SDPA off the kernels that take
the causal pattern as a flag. Here the same layout is computed without a mask: queries are the last
``q_len`` positions of the keys, so the pattern is *lower-right* causal, which
``torch.nn.attention.bias.causal_lower_right`` hands to the flash or memory-efficient kernel as a flag; on CUDA
the block is computed as two cuDNN calls (queries on the cached keys without a mask, and on their own keys
causally) merged by their log-sum-exp (:func:`split_sdpa`), which ran faster than that flag on an H200.

Two functions are registered under :data:`NAME` (see :func:`use_lower_right`):
- a mask function that returns no mask when the queries sit at the end of the keys and no padding is present, and
  otherwise builds the ``sdpa`` mask as before (left-padded batches, sliding windows, static caches);
- an attention function that, with no mask, calls SDPA causally (lower-right); for a decode step with a boolean
  mask on CUDA (a padded batch, a static cache: :mod:`ragkit.graph_decode`) computes :func:`decode_attention`;
  and otherwise calls exactly ``sdpa``.

On a CPU SDPA has no lower-right kernel and materializes the pattern, so there is nothing to gain there; the
outputs equal the default path's (tests/ragkit/test_attention.py) and ragkit switches it on for CUDA models only.
Models with latent attention (Mistral-4's MLA) route their decode steps through :mod:`ragkit.mla` (absorbed
``kv_b_proj``) when :func:`use_lower_right` absorbs them; their prefill expands the latents as transformers does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from ragkit import mla

NAME = "ragkit_sdpa"
DECODE_CHUNK = 256  # slots per chunk of a decode step's probs @ value (static caches are sized in whole chunks)


def _mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
          mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None, **kw: Any):
    """No mask where lower-right causal attention is the whole pattern; else the ``sdpa`` mask."""
    plain = mask_function is causal_mask_function and kv_offset == 0 and q_offset + q_length == kv_length
    if plain and (attention_mask is None or bool(attention_mask.all())):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask, **kw)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kw: Any) -> tuple[torch.Tensor, None]:
    """Attention output ``[batch, q_len, heads, v_dim]`` (the layout transformers' attention functions return)."""
    if mla.is_absorbed(module):  # key, value are MLA's latent cache and rotary key
        if query.shape[2] == 1:
            mask = None if attention_mask is None else attention_mask[..., :key.shape[2]]
            return mla.attend(module, query, key, value, mask, scaling)
        key, value = module.ragkit_expand_kv(key, value)
    if query.shape[2] == 1 and query.is_cuda and attention_mask is not None and attention_mask.dtype == torch.bool:
        return decode_attention(query, key, value, attention_mask[..., :key.shape[2]], scaling), None
    if attention_mask is None and getattr(module, "is_causal", True) and 1 < query.shape[2] < key.shape[2]:
        return causal_sdpa(query, key, value, scaling), None
    # a decode step, a fresh prompt (plain causal) or a padded batch: exactly transformers' sdpa
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)


def causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """SDPA of ``query [b, h, q, d]`` on ``key``/``value [b, h_kv, k, d]`` where the queries are the last ``q``
    key positions (lower-right causal, no mask); returns ``[b, q, h, d_v]``."""
    if key.shape[1] != query.shape[1]:  # grouped heads: the lower-right kernels take equal head counts
        reps = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(reps, dim=1), value.repeat_interleave(reps, dim=1)
    v_dim = value.shape[-1]
    if v_dim < query.shape[-1] and query.is_cuda:  # flash needs one head size: pad V, slice the output
        value = F.pad(value, (0, query.shape[-1] - v_dim))
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):  # cuDNN attention's dtypes
        try:
            out = split_sdpa(query, key, value, scaling)
        except RuntimeError:  # no cuDNN attention for these shapes: the lower-right flash kernel
            out = lower_right_sdpa(query, key, value, scaling)
    else:
        out = lower_right_sdpa(query, key, value, scaling)
    return out[..., :v_dim].transpose(1, 2).contiguous()


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scaling: float | None) -> torch.Tensor:
    """One query per row (a decode step) on a padded or static cache: ``query [b, h, 1, d]`` on ``key``/``value
    [b, h_kv, S, d]`` with a boolean ``[b, 1, 1, S]`` mask; returns ``[b, 1, h, d_v]``. Two matmuls and a float32
    softmax with the query heads of each KV head grouped as rows, so K and V are read once, never repeated; SDPA's
    kernels that take a mask give such a step one thread block per (row, KV head), a few percent of an H200."""
    b, h, _, d = query.shape
    kv, slots, dv = key.shape[1], key.shape[2], value.shape[-1]
    q = query.view(b, kv, h // kv, d)
    scores = (q @ key.transpose(-1, -2)).float() * (d**-0.5 if scaling is None else scaling)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(value.dtype)
    if slots % DECODE_CHUNK or slots == DECODE_CHUNK:
        return (probs @ value).reshape(b, h, 1, dv).transpose(1, 2)
    # probs @ value reduces over every slot into a few rows: split the slots so the GPU works on all chunks at once
    n = slots // DECODE_CHUNK
    parts = probs.view(b, kv, -1, n, DECODE_CHUNK).transpose(2, 3) @ value.view(b, kv, n, DECODE_CHUNK, dv)
    return parts.float().sum(2).to(value.dtype).reshape(b, h, 1, dv).transpose(1, 2)


def lower_right_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None):
    """One SDPA call with a lower-right causal bias (flash or memory-efficient on CUDA; materialized on CPU)."""
    bias = causal_lower_right(query.shape[2], key.shape[2])
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling)


def split_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None):
    """The same attention as two cuDNN calls merged by their log-sum-exp: the queries on the cached keys (no
    mask at all) and on their own keys (plain causal, queries = keys). cuDNN's kernels are the ones transformers
    uses for a fresh prompt; on Hopper they run faster per attended pair than the lower-right flash kernel."""
    cached = key.shape[2] - query.shape[2]
    prefix = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key[:, :, :cached], value[:, :, :cached], None, True, 0.0, False, False, scale=scaling)
    own = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key[:, :, cached:], value[:, :, cached:], None, True, 0.0, True, False, scale=scaling)
    return merge_by_lse(prefix[0], prefix[1], own[0], own[1])


def merge_by_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Softmax attention over keys A and B from each part's output and log-sum-exp (``[b, h, q]`` or with a
    trailing 1): the parts weighted by their share of the total normalizer."""
    lse_a, lse_b = lse_a.reshape(out_a.shape[:3]), lse_b.reshape(out_b.shape[:3])
    acc = torch.promote_types(out_a.dtype, torch.float32)
    w_a = torch.sigmoid(lse_a.to(acc) - lse_b.to(acc)).unsqueeze(-1)  # exp(a) / (exp(a) + exp(b))
    return (out_a.to(acc) * w_a + out_b.to(acc) * (1 - w_a)).to(out_a.dtype)


def register() -> str:
    """Register :data:`NAME` with transformers (idempotent); returns the name."""
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


def use_lower_right(model: Any, absorb_mla: bool = True) -> bool:
    """Switch ``model`` (a transformers model using ``sdpa``) to the mask-free path, and with ``absorb_mla`` its
    latent-attention modules to :mod:`ragkit.mla`'s decode; other implementations stay. True if switched."""
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    model.set_attn_implementation(register())
    if absorb_mla:
        mla.absorb(model)
    return True
