"""Where the blocks of an NF4 model go: whole decoder layers on GPUs and the CPU, as the planner splits them.

:func:`nf4_placement` decides it from the config alone, before any weight is read. A ``device_map``
dict is honoured as given (every module that holds weights must get a device from it, through its own
name or a parent's); ``"auto"`` places the planner's blocks (:func:`ragkit.placement.weight_blocks`: NF4
bytes, whole no-split modules such as decoder layers) within ``max_memory`` exactly as
:func:`ragkit.plan` splits them, so ``LocalLLM(..., device_map="auto", max_memory=plan.max_memory)``
loads the planned split. :func:`dispatch` then attaches accelerate's hooks that move activations
between devices; blocks placed on the CPU run on the CPU (their weights are never copied to a GPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.hooks import attach_align_device_hook_on_blocks
from torch import nn
from transformers import PretrainedConfig

from ragkit.errors import MemoryPlanError
from ragkit.placement import max_memory_with_headroom, place, weight_blocks

Device = int | str  # accelerate's spelling: a GPU index or "cpu"


@dataclass(frozen=True)
class Placement:
    """A module -> device map for an NF4 model and the NF4 bytes it puts on each device (as planned)."""

    device_map: dict[str, Device]  # module name ("" = the whole model) -> GPU index or "cpu"
    bytes_per_device: dict[Device, int]

    def device(self, module: str) -> Device:
        """The device of ``module``: its own entry or its closest parent's; KeyError if none."""
        name = module
        while name not in self.device_map:
            if not name:
                raise KeyError(module)
            name = name.rpartition(".")[0]
        return self.device_map[name]

    def torch_device(self, module: str) -> torch.device:
        return _torch_device(self.device(module))


def _torch_device(device: Device) -> torch.device:
    return torch.device("cpu") if device == "cpu" else torch.device("cuda", device)


def _normalize(device: Any, module: str) -> Device:
    """A device as accelerate writes it in a device map: a GPU index or "cpu"."""
    if isinstance(device, torch.device):
        device = str(device) if device.index is None else f"{device.type}:{device.index}"
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    text = str(device)
    if text == "cpu":
        return "cpu"
    if text == "cuda":
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    if match := re.fullmatch(r"cuda:(\d+)", text):
        return int(match.group(1))
    where = f"for {module!r} " if module else ""
    raise MemoryPlanError(
        f"Device {device!r} {where}is not one ragkit's NF4 loader places weights on: use a GPU index, 'cuda:N' or "
        "'cpu' (disk offload is not supported)."
    )


def nf4_placement(
    model_or_config: PretrainedConfig | str | Path,
    device_map: str | int | torch.device | dict[str, Any] | None = "auto",
    max_memory: dict[int | str, int | str] | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    where: str = "",
) -> Placement:
    """The placement :func:`~ragkit.quant.load_nf4` uses for a model directory or config (nothing is loaded).

    ``device_map``: one device ("cuda:1", "cpu", 0), a dict of module name -> device (honoured as given),
    or "auto"/None: the planner's blocks within ``max_memory`` (GPU index or "cpu" -> bytes or "24GiB";
    default: free memory of every GPU and the CPU less 12% headroom). Raises MemoryPlanError naming the
    modules a dict leaves without a device, or with the planned bytes when ``max_memory`` cannot hold them.
    """
    blocks = weight_blocks(model_or_config, quant="nf4", moe_experts="ragkit",
                           compute_dtype=str(compute_dtype).removeprefix("torch."))
    prefix = f"{where}: " if where else ""
    if device_map is None or device_map == "auto":
        if max_memory is None:
            max_memory = max_memory_with_headroom()
        budgets = {_normalize(k, ""): v for k, v in max_memory.items()}
        try:
            mapping = blocks.with_tied(place(blocks.sizes, budgets))
        except MemoryPlanError as exc:
            raise MemoryPlanError(f"{prefix}ragkit's NF4 model does not fit max_memory. {exc}") from None
    elif isinstance(device_map, dict):
        mapping = {name: _normalize(device, name) for name, device in device_map.items()}
        _check_covers(mapping, {**blocks.block_of, **{b: b for b in blocks.tied}}, prefix)
    else:
        mapping = {"": _normalize(device_map, "")}
    placement = Placement(mapping, {})
    for block, source in blocks.tied.items():
        holder = next(m for m, b in blocks.block_of.items() if b == source)
        if placement.device(block) != placement.device(holder):
            raise MemoryPlanError(
                f"{prefix}{block!r} shares its weight with {holder!r} (tied weights), so both need one device; "
                f"device_map puts them on {placement.device(block)!r} and {placement.device(holder)!r}."
            )
    per_device: dict[Device, int] = {}
    for module, size in blocks.module_bytes.items():
        device = placement.device(module)
        per_device[device] = per_device.get(device, 0) + size
    return Placement(mapping, per_device)


def _check_covers(mapping: dict[str, Device], block_of: dict[str, str], prefix: str) -> None:
    """Every module holding weights gets a device; every key names such a module or a parent of one.

    ``block_of``: module holding weights (or a tied copy of one) -> its placement block, which the
    error names: a whole decoder layer rather than its dozen projections.
    """
    holders = list(block_of)
    unknown = [k for k in mapping if k and not any(m == k or m.startswith(k + ".") for m in holders)]
    if unknown:
        raise MemoryPlanError(
            f"{prefix}device_map names {', '.join(repr(k) for k in unknown[:6])}, which the model does not have "
            "(or which hold no weights); module names are those of model.named_modules()."
        )
    probe = Placement(mapping, {})
    missing = []
    for module in holders:
        try:
            probe.device(module)
        except KeyError:
            missing.append(block_of[module])
    if missing:
        blocks = list(dict.fromkeys(missing))
        shown = ", ".join(repr(b) for b in blocks[:6]) + (f" and {len(blocks) - 6} more" if len(blocks) > 6 else "")
        raise MemoryPlanError(
            f"{prefix}device_map gives no device to {len(blocks)} block(s) that hold weights: {shown}. Add them "
            "(or a parent module, or '' for the rest) to the map, or pass device_map='auto' with max_memory."
        )


def dispatch(model: nn.Module, placement: Placement) -> None:
    """Record the placement as ``hf_device_map`` and, with more than one device, attach the hooks."""
    model.hf_device_map = dict(placement.device_map)
    if len(set(placement.device_map.values())) > 1:
        attach_hooks(model, placement)


def attach_hooks(model: nn.Module, placement: Placement) -> None:
    """accelerate's hooks that move each mapped module's inputs to its device (weights are already there).

    The whole model's inputs go to the device of the input embeddings and its outputs come back to the
    caller's device. The KV cache is not moved (``_skip_keys_device_placement``): each layer keeps its
    cache on its own device. Blocks on the CPU run on the CPU.
    """
    embeddings = model.get_input_embeddings()
    first = next(name for name, module in model.named_modules() if module is embeddings)
    execution = {name: _torch_device(device) for name, device in placement.device_map.items() if name}
    attach_align_device_hook_on_blocks(
        model,
        execution_device={**execution, "": placement.torch_device(first)},
        offload=dict.fromkeys(execution, False),
        skip_keys=model._skip_keys_device_placement,
    )
