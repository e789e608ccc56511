"""Quantization: expert-aware NF4 for fused MoE experts and streamed FP8/BF16 -> NF4 loading.

``load_nf4(path)`` is what ``LocalLLM(path, quantization="nf4")`` uses for models whose routed
experts are fused 3-D tensors (Mistral-Small-4 and most transformers-5 MoE families).
"""

from ragkit.quant.experts import ExpertLayout, NF4Experts, expert_layout_for, register_expert_layout
from ragkit.quant.footprint import Footprint, measure_footprint
from ragkit.quant.fp8 import dequantize_fp8, quantize_fp8, write_fp8_checkpoint
from ragkit.quant.loader import has_fused_experts, load_nf4, needs_ragkit_nf4
from ragkit.quant.placement import Placement, nf4_placement

__all__ = [
    "ExpertLayout",
    "Footprint",
    "NF4Experts",
    "Placement",
    "dequantize_fp8",
    "expert_layout_for",
    "has_fused_experts",
    "load_nf4",
    "measure_footprint",
    "needs_ragkit_nf4",
    "nf4_placement",
    "quantize_fp8",
    "register_expert_layout",
    "write_fp8_checkpoint",
]
