"""Expert-aware NF4: fused 3-D MoE expert tensors stored as one NF4 tensor per routed expert.

transformers 5 stores the routed experts of Mistral-4, Mixtral, Qwen-MoE, DeepSeek-V3 and
most other MoE families as 3-D parameters (``experts.gate_up_proj`` ``[E, 2I, H]``,
``experts.down_proj`` ``[E, H, I]``), which ``BitsAndBytesConfig`` leaves in full precision.
:class:`NF4Experts` replaces such a module: every expert's projection is quantized on its
own (bitsandbytes NF4, double quantization), and the forward runs ``bnb.matmul_4bit`` only
for the experts the router picked, one expert at a time, so no dequantized copy of all
experts ever exists.

How a family lays its experts out is an :class:`ExpertLayout`, found by
:func:`expert_layout_for` in a small registry keyed by module class (or class name).
Classes decorated with transformers' ``@use_experts_implementation`` describe themselves
(``has_gate``, ``is_transposed``, ``has_bias``) and need no entry; register a layout for
any other class with :func:`register_expert_layout`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import nn
from transformers.integrations.moe import _grouped_mm

from ragkit.errors import QuantizationError
from ragkit.quant.nf4 import NESTED_BLOCKSIZE, NF4_BLOCKSIZE, quantize_nf4


@dataclass(frozen=True)
class ExpertLayout:
    """Where a fused-experts module keeps its weights and how its forward uses them.

    ``first`` is the input projection (``gate_up_proj`` with a gate, ``up_proj`` without),
    ``second`` the output projection; ``transposed`` means they are stored ``[E, in, out]``
    instead of ``[E, out, in]``; ``bias`` means ``<name>_bias`` tensors ``[E, out]`` exist.
    """

    first: str = "gate_up_proj"
    second: str = "down_proj"
    has_gate: bool = True
    transposed: bool = False
    bias: bool = False


LayoutFactory = Callable[[nn.Module], ExpertLayout]
_LAYOUTS: dict[type | str, LayoutFactory] = {}


def register_expert_layout(key: type | str, factory: LayoutFactory | ExpertLayout) -> None:
    """Teach ragkit a fused-experts module class (or class name) that is not self-describing."""
    _LAYOUTS[key] = factory if callable(factory) else (lambda _module, _layout=factory: _layout)


def _self_described_layout(module: nn.Module) -> ExpertLayout | None:
    """Layout of a class decorated with transformers' ``@use_experts_implementation``."""
    if not hasattr(module, "is_transposed") or not hasattr(module, "has_gate"):
        return None
    if getattr(module, "has_post_expert_norm", False):
        raise QuantizationError(
            f"{type(module).__name__} applies a norm after each expert, which ragkit's NF4 experts do not "
            "implement yet; load this model without quantization or register an ExpertLayout for it."
        )
    first = "gate_up_proj" if module.has_gate else "up_proj"
    return ExpertLayout(
        first=first, has_gate=module.has_gate, transposed=module.is_transposed, bias=bool(module.has_bias)
    )


def expert_layout_for(module: nn.Module) -> ExpertLayout | None:
    """The layout of ``module`` if it is a fused-experts module with 3-D weights, else None."""
    for key in (*type(module).__mro__, type(module).__name__):
        if key in _LAYOUTS:
            return _LAYOUTS[key](module)
    layout = _self_described_layout(module)
    if layout is None:
        return None
    weight = getattr(module, layout.first, None)
    return layout if isinstance(weight, torch.Tensor) and weight.dim() == 3 else None


class NF4Experts(nn.Module):
    """Routed experts held as per-expert NF4 tensors; computes only the experts tokens were sent to.

    For each projection ``p`` the buffers are ``p_codes`` (uint8 ``[E, out*in/2]``), ``p_absmax``
    (uint8 ``[E, blocks]``), ``p_absmax2`` (float32 ``[E, blocks/256]``) and ``p_offset``
    (float32 ``[E]``): expert ``e``'s slices are exactly what ``bitsandbytes.functional.quantize_4bit``
    returns for that expert's ``[out, in]`` matrix. Create it with :meth:`from_module` (meta
    buffers) and fill it expert by expert with :meth:`set_expert`.
    """

    def __init__(
        self,
        num_experts: int,
        shapes: dict[str, tuple[int, int]],
        layout: ExpertLayout,
        gate_fn: Callable[[torch.Tensor], torch.Tensor],
        compute_dtype: torch.dtype,
        device: torch.device | str = "meta",
    ):
        super().__init__()
        self.num_experts = num_experts
        self.shapes = shapes
        self.layout = layout
        self.gate_fn = gate_fn
        self.compute_dtype = compute_dtype
        self.group_size = max(1, -(-num_experts // 8))  # prefill dequantizes at most 1/8 of the experts at once
        self.use_triton = True  # CUDA prefill: ragkit's Triton kernel dequantizes (where triton imports)
        code = bnbf.get_4bit_type("nf4", device="cpu")
        self.register_buffer("nf4_code", code.to(device))
        self.register_buffer("nested_code", bnbf.create_dynamic_map(signed=True).to(device))
        for name, (rows, cols) in shapes.items():
            blocks = -(-rows * cols // NF4_BLOCKSIZE)
            kw = {"device": device}
            self.register_buffer(f"{name}_codes", torch.empty(num_experts, -(-rows * cols // 2), dtype=torch.uint8, **kw))
            self.register_buffer(f"{name}_absmax", torch.empty(num_experts, blocks, dtype=torch.uint8, **kw))
            nested = -(-blocks // NESTED_BLOCKSIZE)
            self.register_buffer(f"{name}_absmax2", torch.empty(num_experts, nested, dtype=torch.float32, **kw))
            self.register_buffer(f"{name}_offset", torch.empty(num_experts, dtype=torch.float32, **kw))
            if layout.bias:
                self.register_buffer(f"{name}_bias", torch.empty(num_experts, rows, dtype=compute_dtype, **kw))

    @classmethod
    def from_module(cls, module: nn.Module, layout: ExpertLayout, compute_dtype: torch.dtype) -> NF4Experts:
        """An empty (meta) NF4 twin of a fused-experts ``module``; the module's own gate function is kept."""
        shapes = {}
        for name in (layout.first, layout.second):
            e, a, b = getattr(module, name).shape
            shapes[name] = (b, a) if layout.transposed else (a, b)
        gate_fn = module._apply_gate if layout.has_gate else module.act_fn
        return cls(e, shapes, layout, gate_fn, compute_dtype)

    @property
    def logical_params(self) -> int:
        """Number of weights the experts represent (as counted in the unquantized model)."""
        n = sum(r * c for r, c in self.shapes.values()) * self.num_experts
        return n + (sum(r for r, _ in self.shapes.values()) * self.num_experts if self.layout.bias else 0)

    def materialize(self, device: torch.device | str) -> None:
        """Allocate the (still empty) buffers on ``device`` before experts are loaded into them."""
        for name, buf in list(self._buffers.items()):
            if buf is not None and buf.is_meta:
                self._buffers[name] = torch.empty_like(buf, device=device)
        self.nf4_code.copy_(bnbf.get_4bit_type("nf4", device="cpu"))
        self.nested_code.copy_(bnbf.create_dynamic_map(signed=True))

    def set_expert(self, name: str, expert: int, weight: torch.Tensor) -> None:
        """Quantize one expert's projection ``name`` (as stored by the source layout) into the buffers."""
        if self.layout.transposed:
            weight = weight.t()
        if tuple(weight.shape) != self.shapes[name]:
            raise QuantizationError(
                f"Expert {expert} of {name} has shape {tuple(weight.shape)}, expected {self.shapes[name]}."
            )
        codes, state = quantize_nf4(weight.to(self._buffers[f"{name}_codes"].device, self.compute_dtype))
        getattr(self, f"{name}_codes")[expert].copy_(codes.view(-1))
        getattr(self, f"{name}_absmax")[expert].copy_(state.absmax)
        getattr(self, f"{name}_absmax2")[expert].copy_(state.state2.absmax)
        getattr(self, f"{name}_offset")[expert].copy_(state.offset)

    def set_bias(self, name: str, bias: torch.Tensor) -> None:
        """Copy the ``[E, out]`` bias of projection ``name``."""
        getattr(self, f"{name}_bias").copy_(bias)

    def quant_state(self, name: str, expert: int) -> bnbf.QuantState:
        """The bitsandbytes ``QuantState`` of one expert's projection (views into the buffers)."""
        nested = bnbf.QuantState(
            absmax=getattr(self, f"{name}_absmax2")[expert],
            code=self.nested_code,
            blocksize=NESTED_BLOCKSIZE,
            dtype=torch.float32,
        )
        return bnbf.QuantState(
            absmax=getattr(self, f"{name}_absmax")[expert],
            shape=torch.Size(self.shapes[name]),
            code=self.nf4_code,
            blocksize=NF4_BLOCKSIZE,
            quant_type="nf4",
            dtype=self.compute_dtype,
            offset=getattr(self, f"{name}_offset")[expert],
            state2=nested,
        )

    def dequantize_expert(self, name: str, expert: int) -> torch.Tensor:
        """One expert's ``[out, in]`` weight in the compute dtype, exactly as bitsandbytes dequantizes it."""
        codes = getattr(self, f"{name}_codes")[expert].view(-1, 1)
        return bnbf.dequantize_4bit(codes, self.quant_state(name, expert))

    def dequantize_experts(self, name: str, experts: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[G, out, in]`` weights of the experts listed in ``experts``, exactly as bitsandbytes dequantizes each.

        On CUDA in bf16/fp16 with triton importable (and ``use_triton``), one launch of
        :func:`ragkit.quant.nf4_triton.dequantize_nf4_experts` writes them into ``out`` (allocated when None).
        Otherwise one bitsandbytes call: the nested absmax is expanded here (code[absmax] * absmax2 + offset, as
        bitsandbytes does), so the G experts' codes form one NF4 tensor with float32 absmax; this needs
        ``out * in % 64 == 0``, and ``out`` is not used.
        """
        rows, cols = self.shapes[name]
        kernel = self._triton_kernel()
        if kernel is not None:
            if out is None:
                out = torch.empty(len(experts), rows, cols, dtype=self.compute_dtype, device=self.nf4_code.device)
            buffers = (getattr(self, f"{name}_{part}") for part in ("codes", "absmax", "absmax2", "offset"))
            return kernel(*buffers, self.nf4_code, self.nested_code, experts.to(self.nf4_code.device), out)
        absmax = self.nested_code[getattr(self, f"{name}_absmax")[experts].long()]
        scale = getattr(self, f"{name}_absmax2")[experts].repeat_interleave(NESTED_BLOCKSIZE, dim=1)
        absmax = absmax * scale[:, : absmax.shape[1]] + getattr(self, f"{name}_offset")[experts, None]
        state = bnbf.QuantState(
            absmax=absmax.reshape(-1), shape=torch.Size((len(experts) * rows, cols)), code=self.nf4_code,
            blocksize=NF4_BLOCKSIZE, quant_type="nf4", dtype=self.compute_dtype,
        )
        codes = getattr(self, f"{name}_codes")[experts].reshape(-1, 1)
        return bnbf.dequantize_4bit(codes, state).view(len(experts), rows, cols)

    def _triton_kernel(self) -> Callable[..., torch.Tensor] | None:
        """The Triton dequantization where it applies (CUDA buffers, bf16/fp16, triton importable), else None."""
        if not (self.use_triton and self.nf4_code.is_cuda and self.compute_dtype in (torch.bfloat16, torch.float16)):
            return None
        return _triton_dequantize()

    def _project(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        codes = getattr(self, f"{name}_codes")[expert].view(-1, 1)
        bias = getattr(self, f"{name}_bias")[expert] if self.layout.bias else None
        return bnb.matmul_4bit(x, codes.t(), quant_state=self.quant_state(name, expert), bias=bias)

    def _project_group(self, name: str, experts: torch.Tensor, counts: torch.Tensor, x: torch.Tensor,
                       scratch: torch.Tensor | None) -> torch.Tensor:
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        rows, cols = self.shapes[name]
        out = None if scratch is None else scratch[: len(experts) * rows * cols].view(len(experts), rows, cols)
        y = _grouped_mm(x, self.dequantize_experts(name, experts, out).transpose(-2, -1), offsets)
        if self.layout.bias:
            y = y + getattr(self, f"{name}_bias")[experts].repeat_interleave(counts, dim=0)
        return y

    def _group_scratch(self, group: int) -> torch.Tensor | None:
        """One flat buffer that every group's dequantized weights (either projection) are written into, for the
        Triton path: each grouped matmul reads it before the next group's launch overwrites it (one stream), so a
        prefill holds ``group`` x the largest projection in the compute dtype (16 x 32 MiB = 512 MiB for
        Mistral-4), as the bitsandbytes path does. Across forwards (and layers) PyTorch's caching allocator hands
        the same block back. None on the bitsandbytes path (it allocates per call). (Writing the next group on a
        side stream under the current matmul, into a second buffer, gained nothing on an H200: 14.16 vs 14.23 ms
        at 16k tokens.)"""
        if self._triton_kernel() is None:
            return None
        largest = max(r * c for r, c in self.shapes.values())
        return torch.empty(group * largest, dtype=self.compute_dtype, device=self.nf4_code.device)

    def _forward_gathered(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
        """Decode without the host: each of the ``T x k`` (token, expert) pairs gets its expert dequantized by id
        on the device (one kernel launch per projection, ids read by the kernel) and applied as a batched
        matrix-vector product, so a decode step of the model can be captured as a CUDA graph
        (:mod:`ragkit.graph_decode`). Transient: ``T x k`` experts in the compute dtype (48 MiB each for
        Mistral-4, so at most :data:`GATHERED_DECODE_MAX` pairs). Expert-parallel sentinels (ids >= E) add 0."""
        t, k = top_k_index.shape
        ids = top_k_index.reshape(-1)
        local = ids < self.num_experts
        safe = torch.where(local, ids, 0)
        x = hidden_states.to(self.compute_dtype).repeat_interleave(k, dim=0)[:, :, None]
        first, second = self.layout.first, self.layout.second
        h = torch.bmm(self.dequantize_experts(first, safe), x)[..., 0]
        if self.layout.bias:
            h = h + getattr(self, f"{first}_bias")[safe]
        h = self.gate_fn(h)
        y = torch.bmm(self.dequantize_experts(second, safe), h[:, :, None])[..., 0]
        if self.layout.bias:
            y = y + getattr(self, f"{second}_bias")[safe]
        return _top_k_sum(y, top_k_weights * local.view(t, k), hidden_states.dtype)

    def _groupable(self, assignments: int) -> bool:
        """Prefill-sized batches (>= one token per expert on average) dequantize experts in groups."""
        return assignments >= self.num_experts and all(r * c % NF4_BLOCKSIZE == 0 for r, c in self.shapes.values())

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Same contract as the replaced module: ``[T, H]`` states, ``[T, k]`` expert ids and weights.

        Few tokens (decode): on CUDA with the Triton kernel, the routed experts dequantized by id on the device
        (no host sync, so the step can be a CUDA graph: :meth:`_forward_gathered`); else one ``bnb.matmul_4bit``
        per routed expert and projection. Many tokens (prefill): routed experts are dequantized ``group_size`` at
        a time (on CUDA by ragkit's Triton kernel into one reused buffer: :meth:`_group_scratch`) and run as one
        grouped matmul, so at most ``group_size`` experts exist in the compute dtype at once. One host sync (the
        per-expert token counts).
        """
        k = top_k_index.shape[-1]
        if top_k_index.numel() <= GATHERED_DECODE_MAX and self._triton_kernel() is not None:
            return self._forward_gathered(hidden_states, top_k_index, top_k_weights)
        expert_ids = top_k_index.reshape(-1)
        routed = torch.where(expert_ids < self.num_experts, expert_ids, self.num_experts)  # EP sentinels sort last
        counts_all = torch.bincount(routed, minlength=self.num_experts + 1)[: self.num_experts]
        per_expert = counts_all.tolist()  # the forward's one host sync
        n = sum(per_expert)
        order = torch.argsort(routed, stable=True)[:n]
        tokens = order // k
        x = hidden_states.to(self.compute_dtype)[tokens]
        first, second = self.layout.first, self.layout.second
        if self._groupable(n):
            hit_counts = [c for c in per_expert if c]
            hit = torch.tensor([e for e, c in enumerate(per_expert) if c], device=counts_all.device)
            counts = counts_all[hit]
            bounds = [0, *itertools.accumulate(hit_counts)]
            scratch = self._group_scratch(min(self.group_size, len(hit_counts)))
            pieces = []
            for g in range(0, len(hit_counts), self.group_size):
                ids, cnt = hit[g : g + self.group_size], counts[g : g + self.group_size]
                xs = x[bounds[g] : bounds[min(g + self.group_size, len(hit_counts))]]
                h = self.gate_fn(self._project_group(first, ids, cnt, xs, scratch))
                pieces.append(self._project_group(second, ids, cnt, h, scratch))
            y = torch.cat(pieces)
        else:
            pieces, start = [], 0
            for expert, count in enumerate(per_expert):
                if count:
                    xs = x[start : start + count]
                    pieces.append(self._project(second, expert, self.gate_fn(self._project(first, expert, xs))))
                    start += count
            y = torch.cat(pieces) if pieces else x.new_zeros(0, hidden_states.shape[-1])
        # back to (token, k) order by a gather, a zero row for expert-parallel sentinels (index_add_'s bf16
        # atomics took 2.25 ms of a 14 ms 16k-token prefill on an H200)
        back = torch.full((expert_ids.numel(),), n, dtype=torch.long, device=y.device)
        back[order] = torch.arange(n, device=y.device)
        y = torch.cat([y, y.new_zeros(1, y.shape[-1])])[back]
        return _top_k_sum(y, top_k_weights, hidden_states.dtype)


def _top_k_sum(y: torch.Tensor, top_k_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[T, H]``: each token's ``k`` expert outputs (``y``: ``[T * k, H]`` in (token, k) order) weighted and
    summed in float32, in ``dtype``."""
    t, k = top_k_weights.shape
    y = y * top_k_weights.reshape(-1, 1).to(y.dtype)
    return y.view(t, k, -1).sum(dim=1, dtype=torch.float32).to(dtype)


GATHERED_DECODE_MAX = 32  # (token, expert) pairs a decode step dequantizes by id: 8 rows of top-4 (Mistral-4: 1.5 GiB)


@functools.cache
def _triton_dequantize() -> Callable[..., torch.Tensor] | None:
    """:func:`ragkit.quant.nf4_triton.dequantize_nf4_experts` where triton imports (it is no ragkit dependency)."""
    try:
        from ragkit.quant.nf4_triton import dequantize_nf4_experts
    except ImportError:
        return None
    return dequantize_nf4_experts


def replace_fused_experts(model: nn.Module, compute_dtype: torch.dtype) -> dict[str, NF4Experts]:
    """Swap every fused-experts module of ``model`` for an empty :class:`NF4Experts`; returns them by name."""
    replaced = {}
    for name, module in list(model.named_modules()):
        layout = expert_layout_for(module)
        if layout is None:
            continue
        new = NF4Experts.from_module(module, layout, compute_dtype)
        model.set_submodule(name, new)
        replaced[name] = new
    return replaced
