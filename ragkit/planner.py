"""Memory planner: weights per precision, KV cache per token, per-GPU ``max_memory`` split.

Nothing is allocated: the model class is instantiated on the meta device from its config and its
parameters are walked. Each tensor gets the storage it really gets when ragkit loads the model:

* ``quant="none"``: every tensor in the model's dtype (the config's ``dtype``; float32 if unset).
* ``quant="nf4"`` / ``"int8"`` with stock bitsandbytes (transformers' ``replace_with_bnb_linear``): only
  ``nn.Linear`` weights are quantized, except the modules transformers skips (output embeddings, tied
  weights, the last parameter's module, ``_keep_in_fp32_modules``). Embeddings, norms, biases, convolutions,
  routers and 3-D fused MoE expert tensors stay in the compute dtype.
* ``moe_experts="ragkit"``: ragkit's expert-aware NF4 (``ragkit/quant``) also stores every routed expert
  matrix as bitsandbytes NF4.

Byte counts follow bitsandbytes 0.50's storage. NF4 with double quantization (blocksize 64) per weight of
n elements: n/2 packed bytes, n/64 uint8 absmax, fp32 absmax-of-absmax per 256 blocks, a 256-entry fp32
map for the nested absmax, a 16-entry fp32 NF4 code and an fp32 offset. LLM.int8: n int8 bytes plus one
fp32 scale per output row (``SCB``). ``get_memory_footprint`` counts only parameters and buffers (the
packed data, not absmax/SCB), so the plan carries both figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ragkit.errors import MemoryPlanError, QuantizationError
from ragkit.loading import QUANTIZATIONS
from ragkit.placement import (
    DTYPE_BYTES,
    RAGKIT_EXPERT_QUANTS,
    TensorInfo,
    balanced,
    blocks_of,
    dtype_name,
    experts_quantized,
    format_bytes,
    load_config,
    parse_size,
    storage,
    text_config,
    walk,
)

QUANTS = (*QUANTIZATIONS, "none")
MOE_MODES = ("ragkit", "stock")
DEFAULT_HEADROOM = 0.12
# transformers' bitsandbytes quantizers multiply max_memory by this before placing (adjust_max_memory)
BNB_MAX_MEMORY_SCALE = 0.9


# ----------------------------------------------------------------------------------------------- sizes
def parse_gpus(spec: str | Sequence[int | str] | None) -> list[int]:
    """``"3x24GiB"``, ``"80GiB,24GiB"`` or a list of sizes -> one byte count per GPU."""
    if spec is None:
        return []
    if isinstance(spec, str):
        sizes: list[int] = []
        for part in (p.strip() for p in spec.split(",")):
            match = re.fullmatch(r"(\d+)\s*[x×*]\s*(.+)", part, flags=re.IGNORECASE)
            count, size = (int(match.group(1)), match.group(2)) if match else (1, part)
            try:
                if count < 1:
                    raise MemoryPlanError("no GPUs")
                sizes += [parse_size(size)] * count
            except MemoryPlanError:
                raise MemoryPlanError(
                    f"Cannot read the GPU list {spec!r} (--gpus): write COUNTxSIZE or a comma-separated list of "
                    f"sizes, e.g. 3x24GiB or 80GiB,24GiB."
                ) from None
        return sizes
    return [parse_size(s) for s in spec]


# ------------------------------------------------------------------------------------------ KV cache
@dataclass(frozen=True)
class KVCache:
    """KV cache per token and the transient attention workspace, for the cache transformers really keeps."""

    kind: str                    # "GQA" | "MHA" | "MLA (compressed latent)"
    bytes_per_token: int         # the planning figure: what transformers' cache stores per token (all layers)
    layers: int
    alternatives: dict[str, int] = field(default_factory=dict)  # other per-token figures, for comparison
    workspace_per_token: int = 0  # transient bytes per cached token for one layer during attention
    formula: str = ""


def kv_cache(config, dtype_bytes: int) -> KVCache:
    """KV cache per token of the text model (all layers), in the dtype of the activations."""
    tc = text_config(config)
    layers = tc.num_hidden_layers
    heads = tc.num_attention_heads
    if getattr(tc, "kv_lora_rank", None):
        latent = tc.kv_lora_rank + tc.qk_rope_head_dim
        nope_v = tc.qk_nope_head_dim + tc.v_head_dim
        qk = tc.qk_nope_head_dim + tc.qk_rope_head_dim
        decompressed = layers * heads * (qk + tc.v_head_dim) * dtype_bytes
        return KVCache(
            kind="MLA latent",
            bytes_per_token=layers * latent * dtype_bytes,
            layers=layers,
            alternatives={"decompressed K/V of all heads": decompressed},
            # expand_kv: kv_b_proj output (heads*(nope+v)) + the new key tensor (heads*qk) for one layer
            workspace_per_token=heads * (nope_v + qk) * dtype_bytes,
            formula=f"{layers} layers x (kv_lora_rank {tc.kv_lora_rank} + qk_rope_head_dim "
                    f"{tc.qk_rope_head_dim}) x {dtype_bytes} B",
        )
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return KVCache(
        kind="GQA" if kv_heads < heads else "MHA",
        bytes_per_token=2 * layers * kv_heads * head_dim * dtype_bytes,
        layers=layers,
        formula=f"2 (K,V) x {layers} layers x {kv_heads} kv heads x head_dim {head_dim} x {dtype_bytes} B",
    )


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class WeightGroup:
    """One row of the weights table: tensors that share a storage and a reason."""

    name: str
    params: int
    storage: str
    bytes: int
    footprint: int
    why: str


@dataclass(frozen=True)
class GPUShare:
    """What one GPU holds under the plan."""

    index: int
    capacity: int
    usable: int
    weights: int
    kv_cache: int
    workspace: int
    layers: tuple[int, int] | None
    max_memory: int  # pass as max_memory[index] to LocalLLM / from_pretrained(device_map="auto")

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace


@dataclass(frozen=True)
class MemoryPlan:
    """The memory a model needs under one quantization, context and batch, and its split over GPUs."""

    model: str
    architecture: str
    quant: str
    moe_experts: str
    dtype: str
    kv_dtype: str
    params: int
    params_routed_experts: int
    params_vision: int
    groups: tuple[WeightGroup, ...]
    weights_bytes: int
    footprint_bytes: int
    weights_by_precision: dict[str, int]
    kv: KVCache
    context: int
    batch: int
    kv_cache_bytes: int
    workspace_bytes: int
    headroom: float
    gpus: tuple[GPUShare, ...]
    device_map: dict[str, int]
    notes: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        """Weights + KV cache for the context + one layer's attention workspace."""
        return self.weights_bytes + self.kv_cache_bytes + self.workspace_bytes

    @property
    def min_gpu_memory(self) -> int:
        """Smallest single-GPU memory that holds ``total_bytes`` with the headroom left free."""
        return math.ceil(self.total_bytes / (1 - self.headroom))

    @property
    def max_memory(self) -> dict[int, int]:
        """``max_memory`` for ``LocalLLM(..., device_map="auto", max_memory=...)``, per GPU index."""
        return {g.index: g.max_memory for g in self.gpus}

    def table(self) -> str:
        """The plan as a plain-text table."""
        return _render(self)


def plan(
    model_or_config: Any,
    context: int | None = None,
    quant: str = "nf4",
    gpus: str | Sequence[int | str] | None = None,
    headroom: float = DEFAULT_HEADROOM,
    batch: int = 1,
    moe_experts: str = "ragkit",
    dtype: str | None = None,
    compute_dtype: str = "bfloat16",
) -> MemoryPlan:
    """Plan the memory of ``model_or_config`` (config, dict, config.json, model dir, .gguf or "default").

    ``context`` defaults to the model's ``max_position_embeddings``. ``gpus`` is "3x24GiB", "80GiB,24GiB" or
    a list of byte counts; without it the plan has no split. ``headroom`` is the fraction of every GPU left
    free for activations and allocator slack. Raises MemoryPlanError when the model does not fit.
    """
    if quant not in QUANTS:
        raise QuantizationError(f"Unknown quantization {quant!r}: use one of {', '.join(QUANTS)}.")
    if moe_experts not in MOE_MODES:
        raise MemoryPlanError(f"Unknown moe_experts {moe_experts!r}: use 'ragkit' (expert-aware NF4) or 'stock'.")
    if not 0 <= headroom < 1:
        raise MemoryPlanError(f"headroom must be a fraction in [0, 1), e.g. 0.12; got {headroom}.")
    if batch < 1 or (context is not None and context < 1):
        raise MemoryPlanError(f"context and batch must be positive; got context={context}, batch={batch}.")
    for name in (dtype, compute_dtype):
        if name is not None and name not in DTYPE_BYTES:
            raise MemoryPlanError(f"Unknown dtype {name!r}: use one of {', '.join(DTYPE_BYTES)}.")
    sizes = parse_gpus(gpus)

    config, label = load_config(model_or_config)
    tensors, tied, arch, model = walk(config)
    tc = text_config(config)
    context = context or getattr(tc, "max_position_embeddings", None) or 4096

    weight_dtype = dtype_name(config, quant, dtype, compute_dtype)
    experts_q = experts_quantized(quant, moe_experts)
    groups = _groups(tensors, quant, experts_q, weight_dtype)
    weights = sum(g.bytes for g in groups)
    footprint = sum(g.footprint for g in groups)

    kv_dtype = compute_dtype if quant != "none" else weight_dtype
    kv = kv_cache(config, DTYPE_BYTES[kv_dtype])
    kv_bytes = kv.bytes_per_token * context * batch
    workspace = kv.workspace_per_token * context * batch

    by_precision = {}
    for q in QUANTS:
        wd = DTYPE_BYTES[dtype_name(config, q, dtype, compute_dtype)]
        for column, quantized in (("ragkit", experts_quantized(q, "ragkit")), ("stock", False), ("all", True)):
            by_precision[f"{q}/{column}"] = sum(storage(t, q, quantized, wd)[1] for t in tensors)

    n_params = sum(t.numel for t in tensors if t.kind != "buffer")
    n_experts = sum(t.numel for t in tensors if t.kind == "experts")
    n_vision = sum(t.numel for t in tensors if t.kind != "buffer" and _is_vision(t.name))
    notes = _notes(quant, moe_experts, n_experts, kv)

    units = blocks_of(tensors, tied, quant, experts_q, DTYPE_BYTES[weight_dtype])
    blocks = units.sizes
    advice = []
    if quant != "nf4":
        advice.append(f"quant='nf4' (weights {format_bytes(by_precision['nf4/' + moe_experts])})")
    if n_experts and moe_experts == "stock":
        advice.append(f"moe_experts='ragkit' with nf4 (weights {format_bytes(by_precision['nf4/ragkit'])})")
    advice += ["a shorter context", "more or larger GPUs", "a lower headroom"]
    # ragkit's expert-aware NF4 loader places the model itself; everything else goes through from_pretrained
    accelerate = not (experts_q and n_experts)
    shares, device_map = _split(
        blocks, _decoder_layers(model, blocks), kv_bytes // kv.layers, workspace, sizes, headroom,
        f"{label} ({quant}, {context:,} tokens x {batch})", advice,
        accelerate=accelerate, bnb=accelerate and quant != "none",
    )
    device_map = units.with_tied(device_map)
    if sizes and accelerate and quant != "none":
        notes = (*notes, "max_memory is each GPU's weight budget / 0.9: transformers' bitsandbytes quantizers "
                         "multiply max_memory by 0.9 before placing, so accelerate places within the budget.")
    if len(sizes) > 1 and accelerate:
        notes = (*notes, "device_map='auto' balances GPUs 0..N-2 at about total/N + 1.25 x the largest layer and "
                         "can spill to CPU on a tight fit; pass device_map=plan.device_map to use this split exactly.")
    if len(sizes) > 1 and not accelerate:
        notes = (*notes, "ragkit's expert-aware NF4 loader places whole blocks exactly as above: pass "
                         "device_map='auto' with max_memory=plan.max_memory, or device_map=plan.device_map.")
    return MemoryPlan(
        model=label, architecture=arch, quant=quant, moe_experts=moe_experts, dtype=weight_dtype,
        kv_dtype=kv_dtype, params=n_params, params_routed_experts=n_experts, params_vision=n_vision,
        groups=groups, weights_bytes=weights, footprint_bytes=footprint, weights_by_precision=by_precision,
        kv=kv, context=context, batch=batch, kv_cache_bytes=kv_bytes, workspace_bytes=workspace,
        headroom=headroom, gpus=shares, device_map=device_map, notes=notes,
    )


def _is_vision(name: str) -> bool:
    return any(part in name for part in ("vision_tower", "multi_modal_projector", "visual"))


# (tensor kind, storage) -> (row name, why it is stored that way)
_GROUP_TEXT = {
    ("experts", "nf4"): ("routed experts (3-D)", "ragkit NF4Experts: one NF4 tensor per expert"),
    ("experts", "int8"): ("routed experts (3-D)", "ragkit expert-aware int8"),
    ("experts", "plain"): ("routed experts (3-D)", "3-D nn.Parameter, not nn.Linear: bnb skips it"),
    ("linear", "nf4"): ("nn.Linear weights", "bnb Linear4bit: NF4, double quant"),
    ("linear", "int8"): ("nn.Linear weights", "bnb Linear8bitLt: fp32 scale per row"),
    ("linear", "plain"): ("nn.Linear weights", "unquantized"),
    ("linear_skipped", "plain"): ("nn.Linear kept 16-bit", "lm_head / tied / last: transformers skips"),
    ("embedding", "plain"): ("embeddings", "nn.Embedding: never quantized"),
    ("other", "plain"): ("norms, biases, routers, convs", "not nn.Linear weights"),
    ("buffer", "buffer"): ("buffers", "rotary tables"),
}


def _groups(tensors: list[TensorInfo], quant: str, experts_quantized: bool, dtype: str) -> tuple[WeightGroup, ...]:
    rows: dict[tuple[str, str], list[int]] = {}
    for t in tensors:
        label, size, fp = storage(t, quant, experts_quantized, DTYPE_BYTES[dtype])
        acc = rows.setdefault((t.kind, label), [0, 0, 0])
        acc[0] += t.numel
        acc[1] += size
        acc[2] += fp
    storage_name = {"nf4": "nf4 + absmax", "int8": "int8 + scale", "buffer": "float32", "plain": dtype}
    out = [WeightGroup(_GROUP_TEXT[key][0], n, storage_name[key[1]], size, fp, _GROUP_TEXT[key][1])
           for key, (n, size, fp) in rows.items()]
    return tuple(sorted(out, key=lambda g: -g.bytes))


def _notes(quant: str, moe: str, n_experts: int, kv: KVCache) -> tuple[str, ...]:
    notes = []
    if n_experts and quant != "none":
        if moe == "ragkit" and quant in RAGKIT_EXPERT_QUANTS:
            notes.append("Routed experts planned with ragkit's expert-aware NF4 (ragkit/quant): stock bitsandbytes "
                         "converts only nn.Linear and would leave the 3-D expert tensors in 16-bit "
                         "(use moe_experts='stock' to see that figure).")
        elif moe == "ragkit":
            notes.append(f"ragkit quantizes routed experts only in {'/'.join(RAGKIT_EXPERT_QUANTS)}; with "
                         f"{quant} the 3-D expert tensors stay 16-bit, as with stock bitsandbytes.")
        else:
            notes.append("Stock bitsandbytes: only nn.Linear weights are quantized; the routed experts are 3-D "
                         "nn.Parameters (experts.gate_up_proj, experts.down_proj) and stay 16-bit.")
    if kv.kind.startswith("MLA"):
        notes.append("KV cache: transformers' MLA attention caches the compressed latent (kv_lora_rank + "
                     "qk_rope_head_dim per layer, as vLLM does) and decompresses K/V of one layer at a time "
                     "during attention; that transient is the 'attention workspace' line.")
    notes.append("Headroom covers activations, logits and allocator slack; prefill activations of very long "
                 "prompts are not modelled beyond it.")
    return tuple(notes)


# ------------------------------------------------------------------------------------------ GPU split
def _decoder_layers(model, blocks: dict[str, int]) -> dict[str, int]:
    """Placement blocks that are text decoder layers (they hold KV cache) -> layer index."""
    from torch import nn

    prefix = next((name for name, module in model.named_modules()
                   if isinstance(module, nn.ModuleList) and name.endswith("layers") and not _is_vision(name)), None)
    if prefix is None:
        return {}
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)")
    return {name: int(m.group(1)) for name in blocks if (m := pattern.fullmatch(name))}


def _split(blocks: dict[str, int], layers: dict[str, int], layer_kv: int, workspace: int, sizes: list[int],
           headroom: float, label: str, advice: list[str], *, accelerate: bool,
           bnb: bool) -> tuple[tuple[GPUShare, ...], dict[str, int]]:
    """Split the blocks (no-split modules, in module order) over GPUs.

    Each GPU's weight budget is chosen so that, whichever decoder layers land on it, weights + their KV
    cache + one layer's attention workspace stay within capacity x (1 - headroom):
    budget = max((usable - workspace) / (1 + r), usable - workspace - KV of all layers), r the largest
    KV-to-weights ratio of a decoder layer.
    With ``accelerate`` (from_pretrained with device_map="auto") the placement mimics accelerate: GPU 0
    keeps room for the largest block, and with bitsandbytes transformers scales max_memory by 0.9 before
    placing, so the published max_memory is budget / 0.9 and the placement budget stays the planned one.
    """
    if not sizes:
        return (), {}
    ratio = max((layer_kv / blocks[name] for name in layers if blocks[name]), default=0.0)
    usable = [int(c * (1 - headroom)) for c in sizes]
    kv_all = layer_kv * len(layers)  # a GPU never holds more KV than all layers'
    budgets = [max(0, int((u - workspace) / (1 + ratio)), u - workspace - kv_all) for u in usable]
    room = list(budgets)
    if accelerate:
        room[0] = max(0, room[0] - max(blocks.values()))
    weights_total = sum(blocks.values())
    placed = balanced(blocks, room)
    if placed is None:
        reserve = (f"; accelerate also keeps {format_bytes(max(blocks.values()))} free on GPU 0 for the largest "
                   f"block" if accelerate and len(sizes) > 1 else "")
        workspace_note = f" + {format_bytes(workspace)} attention workspace on each GPU with layers" if workspace else ""
        raise MemoryPlanError(
            f"{label} does not fit on {len(sizes)} GPU(s) of {', '.join(format_bytes(c) for c in sizes)}: it needs "
            f"weights {format_bytes(weights_total)} + KV cache {format_bytes(kv_all)}{workspace_note}, in whole "
            f"decoder layers, and the GPUs give {format_bytes(sum(usable))} after {headroom:.0%} headroom{reserve}. "
            f"Try " + ", ".join(advice) + "."
        )
    shares = []
    for index, capacity in enumerate(sizes):
        names = [n for n, d in placed.items() if d == index]
        idx = sorted(layers[n] for n in names if n in layers)
        shares.append(GPUShare(
            index=index, capacity=capacity, usable=usable[index], weights=sum(blocks[n] for n in names),
            kv_cache=layer_kv * len(idx), workspace=workspace if idx else 0,
            layers=(idx[0], idx[-1]) if idx else None,
            max_memory=int(budgets[index] / BNB_MAX_MEMORY_SCALE) if bnb else budgets[index],
        ))
    return tuple(shares), placed


# ------------------------------------------------------------------------------------------ rendering
def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e7 else f"{n / 1e6:,.3f} MB" if n >= 1e4 else f"{n:,.0f} B"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**24 else f"{n / 2**20:,.3f} MiB" if n >= 2**14 else f"{n:,.0f} B"


def _render(p: MemoryPlan) -> str:
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    def table(title: str, *columns: str) -> Table:
        t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False, min_width=len(title))
        for col in columns:
            t.add_column(col.lstrip("<"), justify="left" if col.startswith("<") else "right")
        return t

    out = io.StringIO()
    console = Console(file=out, width=130, color_system=None, highlight=False, soft_wrap=False)
    experts = ""
    if p.params_routed_experts:
        experts = " | MoE experts: " + ("ragkit expert-aware" if p.moe_experts == "ragkit" else "stock bitsandbytes")
    console.print(f"Memory plan: {p.model} ({p.architecture}) | quant {p.quant}{experts} | "
                  f"context {p.context:,} x batch {p.batch} | weights {p.dtype}, KV cache {p.kv_dtype}")
    line = f"{p.params / 1e9:.2f} B parameters"
    if p.params_routed_experts:
        text = p.params - p.params_vision
        line += (f"; text model {text / 1e9:.2f} B, of which routed experts {p.params_routed_experts / 1e9:.2f} B "
                 f"({p.params_routed_experts / text:.1%})")
    if p.params_vision:
        line += f"; vision tower + projector {p.params_vision / 1e9:.2f} B"
    console.print(line)

    weights = table("Weights", "<tensors", "params", "<storage", "allocated", "get_memory_footprint", "<why")
    for g in p.groups:
        weights.add_row(g.name, f"{g.params / 1e9:.3f} B", g.storage, _gb(g.bytes), _gb(g.footprint), g.why)
    weights.add_row("total", f"{p.params / 1e9:.3f} B", "", _gb(p.weights_bytes), _gb(p.footprint_bytes),
                    "allocated incl. absmax / scales")
    console.print(weights)

    kv = table("KV cache and totals", "<item", "bytes", "<how")
    kv.add_row(f"KV cache per token ({p.kv.kind})", f"{p.kv.bytes_per_token:,} B",
               f"{p.kv.formula}: what transformers caches (planning figure)")
    for name, per_token in p.kv.alternatives.items():
        kv.add_row(f"  vs {name}", f"{per_token:,} B", "not what LocalLLM stores")
    kv.add_row(f"KV cache, {p.context:,} tokens x {p.batch}", f"{_gb(p.kv_cache_bytes)} = {_gib(p.kv_cache_bytes)}", "")
    if p.workspace_bytes:
        kv.add_row("attention workspace (transient)", f"{_gb(p.workspace_bytes)} = {_gib(p.workspace_bytes)}",
                   "one layer's K/V decompressed from the latent cache during attention")
    kv.add_row("weights", f"{_gb(p.weights_bytes)} = {_gib(p.weights_bytes)}", "")
    kv.add_row("total", f"{_gb(p.total_bytes)} = {_gib(p.total_bytes)}", "weights + KV cache + workspace")
    kv.add_row(f"one GPU needs (headroom {p.headroom:.0%})", f"{_gb(p.min_gpu_memory)} = {_gib(p.min_gpu_memory)}",
               "total / (1 - headroom)")
    console.print(kv)

    columns = ("ragkit", "stock", "all") if p.params_routed_experts else ("ragkit",)
    prec = table("Weights at each precision", "<quant",
                 *(("ragkit", "stock bitsandbytes", "experts quantized too") if p.params_routed_experts else ("weights",)))
    for q in QUANTS:
        prec.add_row(q, *(_gb(p.weights_by_precision[f"{q}/{c}"]) for c in columns))
    console.print(prec)

    if p.gpus:
        split = table(f"Per-GPU split (headroom {p.headroom:.0%})", "GPU", "capacity", "usable", "weights",
                      "KV cache", "workspace", "<decoder layers", "max_memory")
        for g in p.gpus:
            layers = f"{g.layers[0]}-{g.layers[1]}" if g.layers else "-"
            split.add_row(str(g.index), _gib(g.capacity), _gib(g.usable), _gib(g.weights), _gib(g.kv_cache),
                          _gib(g.workspace), layers, _gib(g.max_memory))
        console.print(split)
        console.print("max_memory=" + repr({g.index: f"{g.max_memory // 2**20}MiB" for g in p.gpus}))
    for note in p.notes:
        console.print(f"* {note}")
    return out.getvalue()
