"""NF4 primitives shared by the expert-aware quantizer and the streaming loader.

Every 4-bit tensor ragkit makes is what ``bitsandbytes.nn.Linear4bit`` makes with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``:
NF4 codes in blocks of 64 values, one 8-bit absmax per block, and those absmax values
quantized again in blocks of 256 with a float32 scale each plus one float32 offset.
"""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import nn
from transformers import BitsAndBytesConfig

log = logging.getLogger(__name__)

NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
# bitsandbytes' packed CPU layout (AVX512-BF16 kernel) tiles out_features by 32 and needs whole
# 64-value blocks along each row (bitsandbytes.functional._convert_weight_packed_for_cpu).
CPU_PACK_TILE = 32


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


def nf4_cpu_packed_bytes(n_values: int) -> int:
    """Bytes one ``Linear4bit`` weight holds once bitsandbytes repacked it for the AVX512-BF16 CPU kernel.

    Codes stay 4-bit; the absmax becomes one bf16 per 64-value block (no longer double-quantized); the
    16-entry NF4 code and the fp32 offset stay. Exact: ``measure_footprint`` counts the same tensors.
    """
    return -(-n_values // 2) + 2 * -(-n_values // NF4_BLOCKSIZE) + 4 * 16 + 4


def nf4_bytes(n_values: int) -> int:
    """Bytes one NF4 tensor of ``n_values`` takes: packed codes + 8-bit absmax + nested absmax + offset."""
    blocks = -(-n_values // NF4_BLOCKSIZE)
    nested = -(-blocks // NESTED_BLOCKSIZE)
    return -(-n_values // 2) + blocks + 4 * nested + 4


# ------------------------------------------------------------------ the packed CPU path (AVX512-BF16)
def cpu_packing_available() -> bool:
    """True on CPUs where bitsandbytes repacks ``Linear4bit`` weights for its AVX512-BF16 kernel.

    There, the first inference-mode forward on the CPU converts each layer's NF4 codes to a tiled
    layout and its absmax to un-nested bf16, and the matmul runs in bf16 whatever the compute dtype.
    """
    return bool(bnbf.has_avx512bf16())


def cpu_packable(out_features: int, in_features: int) -> bool:
    """Whether bitsandbytes' packed CPU layout can hold an ``[out_features, in_features]`` NF4 weight."""
    return out_features % CPU_PACK_TILE == 0 and in_features % NF4_BLOCKSIZE == 0


def set_cpu_packing(model: nn.Module, enabled: bool = True) -> list[str]:
    """Choose, per ``Linear4bit`` of ``model``, whether bitsandbytes may take its packed CPU path.

    ``enabled=True`` (what ragkit's loaders apply) lets every layer whose shape the packed layout can
    hold take the fast path where the CPU has AVX512-BF16, and keeps the others on the plain NF4 path
    (bitsandbytes would fail on them: "N must be divisible by block_n"). ``enabled=False`` keeps every
    layer on the plain path (fp32 compute stays fp32). Layers already packed are left as they are.
    Returns the names of the layers kept off the packed path because of their shape.
    """
    available = cpu_packing_available()
    unfit = []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        fits = cpu_packable(module.out_features, module.in_features)
        if not fits:
            unfit.append(name)
        module.support_avx512bf16_for_cpu = available and enabled and fits
    if available and enabled and unfit:
        log.info("NF4 on CPU: %d layer(s) stay on the plain path; the packed AVX512-BF16 kernel needs "
                 "out_features %% %d == 0 and in_features %% %d == 0: %s",
                 len(unfit), CPU_PACK_TILE, NF4_BLOCKSIZE, ", ".join(unfit[:5]) + (" ..." if len(unfit) > 5 else ""))
    return unfit


def is_cpu_packed(module: nn.Module) -> bool:
    """True once bitsandbytes has repacked this ``Linear4bit``'s weight for the AVX512-BF16 kernel."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))
