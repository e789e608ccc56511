"""Dequantization of a group of routed NF4 experts in one Triton launch (CUDA prefill of :class:`NF4Experts`).

The kernel reads :class:`~ragkit.quant.experts.NF4Experts`' buffers in place (no gather of the group's codes,
no absmax expanded by separate torch ops): each program takes ``BLOCKS`` 64-value blocks of one expert, expands
their nested absmax (``nested_code[q] * absmax2[block // 256] + offset``, float32, as bitsandbytes does), and
writes ``nf4_code[nibble] * absmax`` rounded to the output dtype, the high nibble of each byte first. That is
bit for bit what ``bitsandbytes.functional.dequantize_4bit`` returns for the same expert: FMA contraction is
off, so the absmax's multiply and add round apart, as in bitsandbytes' two kernels.

triton is not a ragkit dependency: importing this module needs it (GPU machines have it with torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ragkit.quant.nf4 import NESTED_BLOCKSIZE, NF4_BLOCKSIZE

BLOCKS = 64  # 64-value blocks per program: 2 KiB of codes in, 8 KiB of bf16 out
NUM_WARPS = 4


@triton.jit
def _dequantize_kernel(codes, absmax, absmax2, offset, nf4_code, nested_code, experts, out,
                       code_stride, absmax_stride, absmax2_stride, n_values, n_bytes, n_blocks,
                       BLOCKS: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    g = tl.program_id(1)
    e = tl.load(experts + g).to(tl.int64)
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS] absmax blocks of expert e
    byte = block[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]  # [BLOCKS, 32]
    q = tl.load(codes + e * code_stride + byte, mask=byte < n_bytes, other=0)
    a = tl.load(absmax + e * absmax_stride + block, mask=block < n_blocks, other=0).to(tl.int32)
    a2 = tl.load(absmax2 + e * absmax2_stride + block // NESTED, mask=block < n_blocks, other=0.0)
    scale = tl.load(nested_code + a) * a2 + tl.load(offset + e)
    hi = tl.load(nf4_code + (q >> 4).to(tl.int32)) * scale[:, None]
    lo = tl.load(nf4_code + (q & 15).to(tl.int32)) * scale[:, None]
    value = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # [BLOCKS, 64]
    dst = out + g.to(tl.int64) * n_values + value
    # float32 -> bf16/fp16 rounds to nearest even (cvt.rn), as bitsandbytes' conversion does
    tl.store(dst, tl.interleave(hi, lo).to(out.dtype.element_ty), mask=value < n_values)


def dequantize_nf4_experts(codes: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                           nf4_code: torch.Tensor, nested_code: torch.Tensor, experts: torch.Tensor,
                           out: torch.Tensor, blocks_per_program: int = BLOCKS,
                           num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Write experts ``experts[i]``'s ``[rows, cols]`` weight into ``out[i]`` (``out``: ``[len(experts), rows, cols]``,
    contiguous, bf16 or fp16); one launch, no host sync. ``codes``/``absmax``/``absmax2``/``offset`` are one
    projection's :class:`NF4Experts` buffers (``[E, rows*cols/2]`` uint8, ``[E, blocks]`` uint8, ``[E, blocks/256]``
    float32, ``[E]`` float32). ``blocks_per_program`` (a power of two) and ``num_warps`` tune the launch (the
    benchmark compares a few). Returns ``out``."""
    groups, rows, cols = out.shape
    n = rows * cols
    blocks = -(-n // NF4_BLOCKSIZE)
    if groups != len(experts) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{len(experts)}, rows, cols] tensor, got {tuple(out.shape)}")
    if codes.shape[1] != -(-n // 2) or absmax.shape[1] != blocks or absmax2.shape[1] != -(-blocks // NESTED_BLOCKSIZE):
        raise ValueError(f"NF4 buffers {tuple(codes.shape)}, {tuple(absmax.shape)}, {tuple(absmax2.shape)} "
                         f"do not hold [{rows}, {cols}] experts")
    if groups:
        grid = (triton.cdiv(blocks, blocks_per_program), groups)
        _dequantize_kernel[grid](codes, absmax, absmax2, offset, nf4_code, nested_code, experts, out,
                                 codes.stride(0), absmax.stride(0), absmax2.stride(0), n, codes.shape[1], blocks,
                                 BLOCKS=blocks_per_program, BLOCKSIZE=NF4_BLOCKSIZE, NESTED=NESTED_BLOCKSIZE,
                                 num_warps=num_warps, enable_fp_fusion=False)
    return out
