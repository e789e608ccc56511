"""NF4 primitives shared by the expert-aware quantizer and the streaming loader.

Every 4-bit tensor ragkit makes is what ``bitsandbytes.nn.Linear4bit`` makes with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``:
NF4 codes in blocks of 64 values, one 8-bit absmax per block, and those absmax values
quantized again in blocks of 256 with a float32 scale each plus one float32 offset.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from transformers import BitsAndBytesConfig

NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


def bnb_nf4_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """The bitsandbytes NF4 configuration of every 4-bit layer ragkit makes: stock ``from_pretrained``
    (:func:`ragkit.loading.quantization_config`) and the expert-aware loader alike. ``quant_storage`` is
    uint8, bitsandbytes' default, so both paths store what the planner counts."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, bnbf.QuantState]:
    """Quantize a 2-D ``[out, in]`` weight to NF4 with double quantization on its own device."""
    return bnbf.quantize_4bit(
        weight.contiguous(),
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=torch.uint8,
    )


def set_linear4bit_weight(module: bnb.nn.Linear4bit, weight: torch.Tensor, device: torch.device) -> None:
    """Quantize ``weight`` into ``module`` (a meta ``Linear4bit``) directly on ``device``."""
    param = bnb.nn.Params4bit(
        weight.to(device),
        requires_grad=False,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=module,
    )
    module.weight = param._quantize(device)


def nf4_bytes(n_values: int) -> int:
    """Bytes one NF4 tensor of ``n_values`` takes: packed codes + 8-bit absmax + nested absmax + offset."""
    blocks = -(-n_values // NF4_BLOCKSIZE)
    nested = -(-blocks // NESTED_BLOCKSIZE)
    return -(-n_values // 2) + blocks + 4 * nested + 4

