"""Quantization: expert-aware NF4 for fused MoE experts and streamed FP8/BF16 -> NF4 loading.

``load_nf4(path)`` is what ``LocalLLM(path, quantization="nf4")`` uses for models whose routed
experts are fused 3-D tensors (Mistral-Small-4 and most transformers-5 MoE families).

Public names are imported on first use, so that importing one primitive (``ragkit.quant.nf4``,
as the placement engine does) does not import the loader, which itself places through
:mod:`ragkit.placement`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ragkit.lazy import lazy_exports

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ExpertLayout": "ragkit.quant.experts",
    "NF4Experts": "ragkit.quant.experts",
    "expert_layout_for": "ragkit.quant.experts",
    "register_expert_layout": "ragkit.quant.experts",
    "Footprint": "ragkit.quant.footprint",
    "measure_footprint": "ragkit.quant.footprint",
    "dequantize_fp8": "ragkit.quant.fp8",
    "quantize_fp8": "ragkit.quant.fp8",
    "write_fp8_checkpoint": "ragkit.quant.fp8",
    "has_fused_experts": "ragkit.quant.loader",
    "load_nf4": "ragkit.quant.loader",
    "needs_ragkit_nf4": "ragkit.quant.loader",
    "Placement": "ragkit.quant.placement",
    "nf4_placement": "ragkit.quant.placement",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from ragkit.quant.experts import ExpertLayout, NF4Experts, expert_layout_for, register_expert_layout  # noqa: F401
    from ragkit.quant.footprint import Footprint, measure_footprint  # noqa: F401
    from ragkit.quant.fp8 import dequantize_fp8, quantize_fp8, write_fp8_checkpoint  # noqa: F401
    from ragkit.quant.loader import has_fused_experts, load_nf4, needs_ragkit_nf4  # noqa: F401
    from ragkit.quant.placement import Placement, nf4_placement  # noqa: F401


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
