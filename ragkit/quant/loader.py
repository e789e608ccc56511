"""Stream a BF16 or FP8 safetensors checkpoint into an NF4 model, one tensor at a time.

The model is built on the meta device; its ``nn.Linear`` layers become bitsandbytes
``Linear4bit`` exactly as ``BitsAndBytesConfig(load_in_4bit=True)`` would make them, and its
fused-experts modules become :class:`~ragkit.quant.experts.NF4Experts`. Then the shards are
read one by one: each tensor is dequantized from FP8 with its scale if needed, quantized to
NF4 on the device of its module and dropped, and fused experts are read one expert at a time
(``safe_open(...).get_slice``). Host memory therefore holds at most one shard's pages plus
one tensor in float32, never the BF16 model. Where each module goes (one device, a device map,
or the planner's split of whole decoder layers over GPUs and the CPU) is decided on the meta
model before the first tensor is read (:mod:`ragkit.quant.placement`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import accelerate
import bitsandbytes as bnb
import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key
from transformers.integrations.bitsandbytes import replace_with_bnb_linear
from transformers.quantizers.base import get_keys_to_not_convert

from ragkit.errors import MemoryPlanError, ModelLoadError, QuantizationError
from ragkit.models import model_class
from ragkit.quant.experts import NF4Experts, expert_layout_for, replace_fused_experts
from ragkit.quant.fp8 import (
    CheckpointFormat,
    check_known_key,
    check_layout,
    checkpoint_format,
    dequantize_fp8,
    expert_scale,
    is_scale_key,
    scale_key,
)
from ragkit.quant.nf4 import bnb_nf4_config, set_cpu_packing, set_linear4bit_weight
from ragkit.quant.placement import Placement, dispatch, nf4_placement

log = logging.getLogger(__name__)

# Per-expert checkpoint names (Mixtral w1/w3/w2, Qwen/DeepSeek gate/up/down) -> (projection, half).
_PER_EXPERT = re.compile(r"^(?P<module>.+)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_HALF = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": None, "w2": None}


def build_empty_model(config: PretrainedConfig, compute_dtype: torch.dtype) -> PreTrainedModel:
    """The text-generation model for ``config`` with its parameters on the meta device (buffers stay real)."""
    cls = model_class(config)
    with accelerate.init_empty_weights():
        if hasattr(cls, "from_config"):  # an Auto class
            return cls.from_config(config, dtype=compute_dtype)
        return cls._from_config(config, dtype=compute_dtype)


def has_fused_experts(model_or_config: PreTrainedModel | PretrainedConfig | str | Path) -> bool:
    """True when the model keeps routed experts in fused 3-D tensors (needs ragkit's expert-aware NF4)."""
    model = model_or_config
    if not isinstance(model, nn.Module):
        config = model if isinstance(model, PretrainedConfig) else AutoConfig.from_pretrained(model)
        model = build_empty_model(config, torch.bfloat16)
    return any(expert_layout_for(m) is not None for m in model.modules())


def needs_ragkit_nf4(config: PretrainedConfig) -> bool:
    """True when stock bitsandbytes cannot give this model 4 bits: fused experts, or an FP8 checkpoint."""
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return method == "fp8" or has_fused_experts(config)


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [path / n for n in names]
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"No .safetensors files in {path}; ragkit's NF4 loader reads safetensors checkpoints.")
    return shards


class _Stream:
    """Loads checkpoint tensors into the converted meta model, one at a time."""

    def __init__(self, model: PreTrainedModel, experts: dict[str, NF4Experts], fmt: CheckpointFormat,
                 placement: Placement, where: str):
        self.model, self.experts, self.fmt, self.placement, self.where = model, experts, fmt, placement, where
        self.scales: dict[str, torch.Tensor] = {}
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []
        self.halves: dict[tuple[str, int], dict[int, torch.Tensor]] = {}

    def _dequant(self, key: str, tensor: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if scale is None:
            return tensor
        return dequantize_fp8(tensor, scale.to(tensor.device), self.fmt.block_size, key)

    def _set_plain(self, name: str, tensor: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        device = self.placement.torch_device(module_name)
        if attr in module._parameters:
            old = module._parameters[attr]
            # copy=True: a tensor read from a shard is a view of the whole mapped shard, which must not stay alive
            module._parameters[attr] = nn.Parameter(tensor.to(device, old.dtype, copy=True), requires_grad=False)
        else:
            module._buffers[attr] = tensor.to(device, module._buffers[attr].dtype, copy=True)

    def load_fused(self, key: str, module_name: str, proj: str, reader) -> None:
        module = self.experts[module_name]
        device = self.placement.torch_device(module_name)
        if proj.endswith("_bias"):
            module.set_bias(proj[: -len("_bias")], reader.get_tensor(key).to(device))
            return
        sliced = reader.get_slice(key)
        scale = self.scales.get(scale_key(key))
        for e in range(module.num_experts):
            w = sliced[e].to(device)
            s = None if scale is None else expert_scale(scale, e, module.num_experts, key)
            module.set_expert(proj, e, self._dequant(key, w, s))

    def load_per_expert(self, key: str, match: re.Match, tensor: torch.Tensor) -> None:
        module = self.experts[match["module"]]
        expert, half = int(match["expert"]), _HALF[match["proj"]]
        device = self.placement.torch_device(match["module"])
        weight = self._dequant(key, tensor.to(device), self.scales.get(scale_key(key)))
        if half is None:
            module.set_expert(module.layout.second, expert, weight)
            return
        pending = self.halves.setdefault((match["module"], expert), {})
        pending[half] = weight
        if len(pending) == 2:
            module.set_expert(module.layout.first, expert, torch.cat([pending[0], pending[1]], dim=0))
            del self.halves[(match["module"], expert)]

    def load_tensor(self, key: str, name: str, reader) -> None:
        module_name, _, attr = name.rpartition(".")
        if module_name in self.experts:
            self.load_fused(key, module_name, attr, reader)
            self.loaded.add(name)
            return
        per_expert = _PER_EXPERT.match(name)
        if per_expert and per_expert["module"] in self.experts:
            self.load_per_expert(key, per_expert, reader.get_tensor(key))
            self.loaded.add(f"{per_expert['module']}.*")
            return
        try:
            module = self.model.get_submodule(module_name)
        except AttributeError:
            self.unexpected.append(key)
            return
        device = self.placement.torch_device(module_name)
        tensor = self._dequant(key, reader.get_tensor(key).to(device), self.scales.get(scale_key(key)))
        if isinstance(module, bnb.nn.Linear4bit) and attr == "weight":
            set_linear4bit_weight(module, tensor.to(module.compute_dtype), device)
        elif attr in module._parameters or attr in module._buffers:
            self._set_plain(name, tensor)
        else:
            self.unexpected.append(key)
            return
        self.loaded.add(name)


def _with_shard(shard: Path, fn, *args):
    """Run ``fn(reader, *args)`` on an open shard; the shard's mapping dies when this returns."""
    with safe_open(str(shard), framework="pt") as f:
        return fn(f, *args)


def _survey(shards: list[Path], fmt: CheckpointFormat, where: str) -> tuple[list[tuple[Path, list[str]]], dict]:
    """List every shard's keys, read all FP8 scales (small) and validate every layout before loading."""
    listing = [(shard, _with_shard(shard, lambda f: list(f.keys()))) for shard in shards]
    scales: dict[str, torch.Tensor] = {}
    for shard, keys in listing:
        for key in keys:
            check_known_key(key, where)
        scale_keys = [k for k in keys if k.endswith("_scale_inv")]
        if scale_keys and not fmt.fp8:
            raise QuantizationError(
                f"{where}: tensor {scale_keys[0]!r} is an FP8 scale but config.json has no FP8 "
                "quantization_config; the checkpoint is incomplete or mislabelled."
            )
        scales.update(_with_shard(shard, lambda f, ks: {k: f.get_tensor(k).clone() for k in ks}, scale_keys))

    def validate(f, keys: list[str]) -> None:
        for key in keys:
            if not is_scale_key(key):
                info = f.get_slice(key)
                check_layout(key, info.get_dtype().startswith("F8"), info.get_shape(),
                             scales.get(scale_key(key)), fmt.block_size)

    for shard, keys in listing:
        _with_shard(shard, validate, keys)
    return listing, scales


def load_nf4(
    path: str | Path,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str | int | torch.device | dict[str, Any] | None = "auto",
    max_memory: dict[int | str, int | str] | None = None,
    progress: bool = True,
) -> PreTrainedModel:
    """Load a BF16 or FP8 safetensors checkpoint as an NF4 model, streaming tensor by tensor.

    Dense ``nn.Linear`` layers become bitsandbytes ``Linear4bit`` (NF4, double quantization,
    ``compute_dtype``); fused MoE experts become :class:`NF4Experts`; embeddings, norms, the router
    and the output head stay in ``compute_dtype`` as bitsandbytes leaves them.

    ``device`` is one device ("cuda:1", "cpu", 0), a device map (module name -> GPU index or "cpu",
    honoured as given), or "auto": whole blocks spread over the devices of ``max_memory`` as
    :func:`ragkit.plan` splits them (see :func:`~ragkit.quant.placement.nf4_placement`). With more than
    one device, accelerate's hooks move activations between them. The model's ``nf4_placement`` says
    where each block went and the NF4 bytes planned per device; ``hf_device_map`` is set as
    ``from_pretrained`` sets it.
    """
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    fmt = checkpoint_format(config, str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model we build is NF4, not FP8
    placement = nf4_placement(config, device, max_memory, compute_dtype, str(path))
    gpus = [d for d in placement.bytes_per_device if d != "cpu"]
    if gpus and max(gpus) >= torch.cuda.device_count():
        raise MemoryPlanError(
            f"{path}: the placement puts weights on GPU {max(gpus)}, but torch sees {torch.cuda.device_count()} "
            "CUDA device(s); pass devices that exist (or 'cpu')."
        )
    log.info("NF4 placement of %s: %s", path,
             {d: f"{b / 2**30:.2f} GiB" for d, b in placement.bytes_per_device.items()})
    model = build_empty_model(config, compute_dtype)
    expected = dict.fromkeys(model.state_dict())
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    keep = list({*get_keys_to_not_convert(model), *(model._keep_in_fp32_modules or [])})
    experts = replace_fused_experts(model, compute_dtype)
    replace_with_bnb_linear(model, modules_to_not_convert=keep, quantization_config=bnb_nf4_config(compute_dtype))
    for name, module in experts.items():
        module.materialize(placement.torch_device(name))

    listing, scales = _survey(_shards(path), fmt, str(path))
    stream = _Stream(model, experts, fmt, placement, str(path))
    stream.scales = scales

    def load_shard(f, keys: list[str]) -> None:
        for key in keys:
            if not is_scale_key(key):
                name, _ = rename_source_key(key, renamings, [], model.base_model_prefix, expected)
                stream.load_tensor(key, name, f)
                bar.update()

    total = sum(not is_scale_key(k) for _, keys in listing for k in keys)
    bar = tqdm(total=total, desc=f"NF4 {path.name}", unit="tensor", disable=not progress)
    for shard, keys in listing:
        _with_shard(shard, load_shard, keys)
    bar.close()
    if stream.halves:
        (module, expert), _ = next(iter(stream.halves.items()))
        raise ModelLoadError(f"{path}: expert {expert} of {module} has only one of its gate/up projections.")
    _finish(model, expected, stream, placement, path)
    dispatch(model, placement)
    set_cpu_packing(model)
    model.nf4_placement = placement
    return model


def _finish(model, expected, stream: _Stream, placement: Placement, path: Path) -> None:
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    done = {n.rsplit(".", 1)[0] for n in stream.loaded if n.endswith(".*")}
    missing = [
        n for n in expected
        if n not in stream.loaded and n not in tied and n.rsplit(".", 1)[0] not in done
    ]
    if missing:
        raise ModelLoadError(
            f"{path}: the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}; "
            "it is truncated or belongs to another architecture."
        )
    if stream.unexpected:
        log.warning("%s: ignored %d checkpoint tensors the model has no place for, e.g. %s",
                    path, len(stream.unexpected), stream.unexpected[:3])
    model.tie_weights()
    for module_name, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != (device := placement.torch_device(module_name)):
                module._buffers[name] = buf.to(device)
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.requires_grad_(False)
    model.eval()
