"""The placement engine: a model's weight blocks and their planned bytes, and which device holds each block.

Nothing is allocated: the model class is instantiated on the meta device from its config and its
parameters are walked (:func:`walk`); each tensor gets the storage ragkit really gives it under a
quantization (:func:`storage`), and tensors are grouped into placement blocks (whole no-split modules
such as decoder layers). :func:`place` puts blocks on devices within budgets. Both the user-facing
plan (:mod:`ragkit.planner`) and the NF4 loader (:mod:`ragkit.quant.placement`) place through here,
so a loaded model matches its plan.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragkit.errors import MemoryPlanError, ModelNotFoundError, QuantizationError

# Quantizations for which ragkit/quant stores routed experts in low precision (issue 7: NF4 only).
RAGKIT_EXPERT_QUANTS = ("nf4",)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


# ----------------------------------------------------------------------------------------------- sizes
def parse_size(text: str | int) -> int:
    """``"24GiB"``, ``"80GB"``, ``"512MiB"`` or a byte count -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise MemoryPlanError(f"GPU memory must be positive, got {text} bytes.")
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(text), flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise MemoryPlanError(
            f"Cannot read the memory size {text!r}: write a positive number with a unit, e.g. 24GiB, 80GB, 512MiB."
        )
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def format_bytes(n: float) -> str:
    """Bytes as decimal GB with GiB beside (the seed figures are decimal GB)."""
    if abs(n) >= 10**9:
        return f"{n / 10**9:.2f} GB ({n / 2**30:.2f} GiB)"
    if abs(n) >= 10**6:
        return f"{n / 10**6:.2f} MB ({n / 2**20:.2f} MiB)"
    return f"{n / 10**3:.1f} kB"


def max_memory_with_headroom(headroom: float = 0.12) -> dict[int | str, int]:
    """Per-device memory budgets for ``device_map="auto"``, keeping ``headroom`` of each device free.

    On a GPU the budget is its free memory minus ``headroom`` x its total memory (room for the KV
    cache and activations); on the CPU it is the available RAM times ``1 - headroom``.
    """
    import psutil
    import torch

    if not 0.0 <= headroom < 1.0:
        raise MemoryPlanError(f"headroom must be a fraction in [0, 1), got {headroom!r}")
    budgets: dict[int | str, int] = {}
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        budgets[i] = max(0, int(free - headroom * total))
    budgets["cpu"] = int(psutil.virtual_memory().available * (1.0 - headroom))
    return budgets


# ------------------------------------------------------------------------------------------ storage rules
LINEAR4BIT_CODE_BYTES = 4 * 16 + 4 * 256  # each Linear4bit holds its own NF4 code and nested absmax map (fp32)


def nf4_bytes(numel: int) -> int:
    """Bytes bitsandbytes allocates for one Linear4bit weight of ``numel`` elements (double quantization)."""
    from ragkit.quant.nf4 import nf4_bytes as packed_and_absmax

    return packed_and_absmax(numel) + LINEAR4BIT_CODE_BYTES


def int8_bytes(numel: int, rows: int) -> int:
    """Bytes of one LLM.int8 weight: int8 data plus an fp32 scale (SCB) per output row."""
    return numel + 4 * rows


@dataclass(frozen=True)
class TensorInfo:
    name: str
    numel: int
    shape: tuple[int, ...]
    kind: str          # "linear" | "linear_skipped" | "experts" | "embedding" | "other" | "buffer"
    block: str         # placement unit: the enclosing no-split module, else the owning module
    fp32: bool = False  # kept in float32 (``_keep_in_fp32_modules``, or a float32 buffer)


def storage(t: TensorInfo, quant: str, experts_quantized: bool, dtype_bytes: int) -> tuple[str, int, int]:
    """(storage, allocated bytes, bytes get_memory_footprint counts) of one tensor."""
    plain = t.numel * (4 if t.fp32 else dtype_bytes)
    if t.kind == "buffer":
        return "buffer", plain, plain
    if t.kind == "experts" and experts_quantized and quant == "nf4":
        # ragkit NF4Experts: buffers (all counted by get_memory_footprint), one NF4 tensor per expert
        from ragkit.quant.nf4 import nf4_bytes as packed_and_absmax

        size = t.shape[0] * packed_and_absmax(t.numel // t.shape[0]) + LINEAR4BIT_CODE_BYTES // 2
        return "nf4", size, size
    if (t.kind == "experts" and experts_quantized) or t.kind == "linear":
        if quant == "nf4":
            return "nf4", nf4_bytes(t.numel), math.ceil(t.numel / 2)
        if quant == "int8":
            return "int8", int8_bytes(t.numel, t.numel // t.shape[-1]), t.numel
    return "plain", plain, plain


def experts_quantized(quant: str, moe: str) -> bool:
    return moe == "ragkit" and quant in RAGKIT_EXPERT_QUANTS


# ------------------------------------------------------------------------------------------ model walk
def load_config(model_or_config: Any):
    """(config, label) from a config object, dict, config.json, model dir, .gguf, cached hub id or "default"."""
    from transformers import AutoConfig, PretrainedConfig

    from ragkit.models import gguf_cache_path, resolve_llm, shipped_config

    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config, getattr(model_or_config, "_name_or_path", "") or model_or_config.model_type
    if isinstance(model_or_config, dict):
        return _config_from_dict(model_or_config), model_or_config.get("model_type", "config")
    path = Path(str(model_or_config)).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _config_from_dict(json.loads(path.read_text())), path.parent.name if path.name == "config.json" else path.stem
    try:
        source = resolve_llm(str(model_or_config))  # raises ModelNotFoundError saying where it looked
    except ModelNotFoundError as exc:
        shipped = shipped_config(str(model_or_config))
        if shipped is None:
            raise ModelNotFoundError(
                f"{exc} To plan, only its config.json is needed: on a connected machine `hf download "
                f"{model_or_config} config.json`, or pass the path of a config.json."
            ) from exc
        return _config_from_dict(json.loads(shipped.read_text())), str(model_or_config)
    if source.is_gguf:
        converted = gguf_cache_path(source.path) / "config.json"  # LocalLLM loads GGUF through this cache
        if converted.is_file():
            return _config_from_dict(json.loads(converted.read_text())), source.path.stem
        return AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name), source.path.stem
    if not (source.path / "config.json").is_file():
        raise ModelNotFoundError(f"{source.path} has no config.json; pass a Hugging Face model directory.")
    label = source.name if "snapshots" in source.path.parts else source.path.name  # a hub id, not its hash
    return _config_from_dict(json.loads((source.path / "config.json").read_text())), label


def _config_from_dict(data: dict):
    from transformers import AutoConfig

    data = {k: v for k, v in data.items() if k != "quantization_config"}  # ragkit re-quantizes from bf16/fp8
    if "model_type" not in data:
        raise MemoryPlanError("The config has no 'model_type': pass a transformers config.json.")
    return AutoConfig.for_model(**data)


def _is_experts(module, param) -> bool:
    """A 3-D routed-experts tensor that ragkit's expert-aware NF4 knows how to quantize."""
    from ragkit.quant.experts import expert_layout_for

    if param.dim() != 3:
        return False
    try:
        return expert_layout_for(module) is not None
    except QuantizationError:  # a layout ragkit cannot quantize: it stays 16-bit, like any other parameter
        return False


def walk(config) -> tuple[list[TensorInfo], dict[str, str], str, Any]:
    """Instantiate on the meta device and classify every parameter and buffer.

    Returns (tensors, tied, architecture name, the meta model); ``tied`` maps a block holding only a
    tied copy of a weight to the block that stores it.
    """
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    from ragkit.models import model_class

    with torch.device("meta"):
        model = model_class(config).from_config(config)
    skip = sorted(set(get_keys_to_not_convert(model)) | set(model._keep_in_fp32_modules or []))
    fp32_keep = list(model._keep_in_fp32_modules or [])
    no_split = set(model._no_split_modules or [])

    block_of: dict[str, str] = {}
    for mname, module in model.named_modules():
        parent = mname.rsplit(".", 1)[0] if "." in mname else ""
        inherited = block_of.get(parent) if mname else None
        block_of[mname] = inherited or (mname if type(module).__name__ in no_split else "")

    tensors: list[TensorInfo] = []
    seen: dict[int, str] = {}  # tied parameters (shared objects) are stored once, by their first owner
    tied: dict[str, str] = {}  # block holding only a tied copy -> block of the stored parameter
    for mname, module in model.named_modules():
        block = block_of[mname] or mname
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                tied[block] = seen[id(param)]
                continue
            seen[id(param)] = block
            fp32 = bool(fp32_keep) and not should_convert_module(mname, fp32_keep)
            if isinstance(module, nn.Embedding):
                kind = "embedding"
            elif _is_experts(module, param):
                kind = "experts"
            elif (type(module) is nn.Linear or isinstance(module, Conv1D)) and pname == "weight":
                kind = "linear" if should_convert_module(mname, skip) else "linear_skipped"
            else:
                kind = "other"
            tensors.append(TensorInfo(f"{mname}.{pname}", param.numel(), tuple(param.shape), kind, block, fp32))
        for bname, buf in module.named_buffers(recurse=False):
            tensors.append(TensorInfo(f"{mname}.{bname}", buf.numel(), tuple(buf.shape), "buffer", block,
                                   buf.dtype == torch.float32))
    return tensors, tied, type(model).__name__, model


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def dtype_name(config, quant: str, dtype: str | None, compute_dtype: str) -> str:
    if quant != "none":
        return compute_dtype
    if dtype:
        return dtype
    found = getattr(config, "dtype", None) or getattr(text_config(config), "dtype", None)
    return str(found).removeprefix("torch.") if found else "float32"


@dataclass(frozen=True)
class WeightBlocks:
    """Planned bytes of a model's weights by the module that holds them, and the placement blocks they form.

    A block is the enclosing no-split module (a whole decoder layer) or else the module itself; blocks are
    what :func:`place` puts on devices, in module order.
    """

    module_bytes: dict[str, int]  # module holding tensors directly -> bytes allocated for them
    block_of: dict[str, str]      # that module -> its placement block
    tied: dict[str, str]          # block holding only a tied copy of a weight -> block holding the weight

    @property
    def sizes(self) -> dict[str, int]:
        """Bytes per block, in module order."""
        sizes: dict[str, int] = {}
        for module, size in self.module_bytes.items():
            block = self.block_of[module]
            sizes[block] = sizes.get(block, 0) + size
        return sizes

    def with_tied(self, device_map: dict[str, Any]) -> dict[str, Any]:
        """``device_map`` plus the blocks holding only tied copies, on the device of the weight they share."""
        out = dict(device_map)
        for block, source in self.tied.items():
            if source in out:
                out.setdefault(block, out[source])
        return out


def blocks_of(tensors: list[TensorInfo], tied: dict[str, str], quant: str, experts_quantized: bool,
                   dtype_bytes: int) -> WeightBlocks:
    module_bytes: dict[str, int] = {}
    block_of: dict[str, str] = {}
    for t in tensors:
        module = t.name.rsplit(".", 1)[0]
        module_bytes[module] = module_bytes.get(module, 0) + storage(t, quant, experts_quantized, dtype_bytes)[1]
        block_of[module] = t.block
    return WeightBlocks(module_bytes, block_of, dict(tied))


def weight_blocks(model_or_config: Any, quant: str = "nf4", moe_experts: str = "ragkit",
                  compute_dtype: str = "bfloat16") -> WeightBlocks:
    """The bytes :func:`plan` counts for each module and placement block of ``model_or_config``."""
    config, _ = load_config(model_or_config)
    tensors, tied, _, _ = walk(config)
    dtype_bytes = DTYPE_BYTES[dtype_name(config, quant, None, compute_dtype)]
    return blocks_of(tensors, tied, quant, experts_quantized(quant, moe_experts), dtype_bytes)


# ------------------------------------------------------------------------------------------ placing
def balanced(blocks: dict[str, int], room: list[int]) -> dict[str, int] | None:
    """Blocks over GPUs with weight budgets ``room``: balanced in proportion to the budgets, else filling in order."""
    total = sum(blocks.values())
    for targets in ([total * r / sum(room) if sum(room) else 0 for r in room], room):
        placed = _place(list(blocks.items()), room, targets)
        if placed is not None:
            return placed
    return None


def place(blocks: dict[str, int], max_memory: dict[int | str, int | str]) -> dict[str, int | str]:
    """Place ``blocks`` (name -> bytes, in module order) on the devices of ``max_memory`` (weight budgets).

    GPUs (int keys) are used in index order and balanced as :func:`plan` balances them (in proportion to
    their budgets, else filled in order); a ``"cpu"`` entry takes what the GPUs cannot hold. Raises
    MemoryPlanError with the planned bytes when the blocks do not fit.
    """
    unknown = [k for k in max_memory if k != "cpu" and (isinstance(k, bool) or not isinstance(k, int) or k < 0)]
    if unknown:
        raise MemoryPlanError(
            f"max_memory keys are GPU indexes (0, 1, ...) and 'cpu'; got {unknown[0]!r}. Disk offload is not supported."
        )
    gpus = sorted(k for k in max_memory if k != "cpu")
    room = [parse_size(max_memory[g]) for g in gpus]
    placed = balanced(blocks, room)
    devices: list[int | str] = list(gpus)
    if placed is None and "cpu" in max_memory:
        room.append(parse_size(max_memory["cpu"]))
        devices.append("cpu")
        placed = _place(list(blocks.items()), room, room)
    if placed is None:
        largest = max(blocks, key=blocks.get)
        budgets = ", ".join(f"{d!r}: {format_bytes(r)}" for d, r in zip(devices, room)) or "nothing"
        raise MemoryPlanError(
            f"The weights need {format_bytes(sum(blocks.values()))} in whole blocks (the largest, {largest!r}, "
            f"{format_bytes(blocks[largest])}), and max_memory gives {{{budgets}}}. Raise max_memory, or add a GPU "
            f"or a 'cpu' entry."
        )
    return {name: devices[index] for name, index in placed.items()}


def _place(blocks: list[tuple[str, int]], max_memory: list[int], targets: list[float]) -> dict[str, int] | None:
    """Fill GPUs in order: a GPU takes blocks while under its target and within its max_memory."""
    placed: dict[str, int] = {}
    gpu, used = 0, 0
    for name, size in blocks:
        while gpu < len(max_memory) and (used + size > max_memory[gpu] or (used >= targets[gpu] and
                                                                            gpu < len(max_memory) - 1)):
            gpu, used = gpu + 1, 0
        if gpu == len(max_memory):
            return None
        placed[name] = gpu
        used += size
    return placed
