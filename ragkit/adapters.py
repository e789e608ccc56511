"""LoRA adapters (PEFT directories, safetensors only): read and check them before any work, attach them to a
loaded base model, and say what they are (the identity that run records and settings hashes carry).

An adapter is checked twice before a base weight is read: its files (``adapter_config.json`` +
``adapter_model.safetensors``, a LoRA config, readable tensors), then its tensors against the base's module
tree built on the meta device (every targeted module exists, is a linear layer, and has the in/out features
the LoRA matrices expect). Fused MoE experts are refused: ragkit's NF4 path packs them as NF4 blocks per
expert (ragkit.quant.experts), which PEFT cannot wrap; attention, dense MLP, shared-expert and router
projections are linear layers and take adapters on every base (fp32, bf16, NF4, int8). See docs/lora.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragkit.errors import AdapterError
from ragkit.files import sha256_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")

AdapterArg = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter directory, read and checked on its own (not yet against a base)."""

    path: Path
    config: dict[str, Any]
    sha256: str  # of adapter_model.safetensors, byte for byte
    config_sha256: str  # of adapter_config.json as canonical JSON
    shapes: dict[str, dict[str, tuple[int, ...]]]  # module name -> {"lora_A": shape, "lora_B": shape}

    def identity(self) -> dict[str, Any]:
        """What a run records about the adapter: both hashes and the config fields that shape it."""
        c = self.config
        return {"path": str(self.path), "sha256": self.sha256, "config_sha256": self.config_sha256,
                "r": c.get("r"), "lora_alpha": c.get("lora_alpha"),
                "target_modules": sorted(_as_list(c.get("target_modules"))),
                "base_model": c.get("base_model_name_or_path"), "modules": len(self.shapes)}

    def hashed(self) -> dict[str, str]:
        """The part of the identity that defines results (not where the directory lies)."""
        return {"sha256": self.sha256, "config_sha256": self.config_sha256}


def adapter_paths(adapter: AdapterArg) -> list[Path]:
    """``adapter`` (None, one path, or several) as a list of paths."""
    if adapter is None:
        return []
    if isinstance(adapter, (str, os.PathLike)):
        return [Path(adapter)]
    return [Path(a) for a in adapter]


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read and check one adapter directory's files; AdapterError names the adapter and what is wrong."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {path}: not a directory; pass a PEFT adapter directory "
                           f"(with {CONFIG_FILE} and {WEIGHTS_FILE}), e.g. what `ragkit finetune` writes")
    weights, config_file = path / WEIGHTS_FILE, path / CONFIG_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        found = f" (found {', '.join(pickles)}: pickle files are not loaded)" if pickles else ""
        raise AdapterError(f"adapter {path}: no {WEIGHTS_FILE}{found}; ragkit loads adapters in safetensors only - "
                           "convert it with PEFT: PeftModel.from_pretrained(...).save_pretrained(dir)")
    if not config_file.is_file():
        raise AdapterError(f"adapter {path}: no {CONFIG_FILE}; a PEFT adapter directory has both files")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"adapter {path}: {CONFIG_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise AdapterError(f"adapter {path}: peft_type is {kind!r}; ragkit loads LoRA adapters only")
    if config.get("use_dora"):
        raise AdapterError(f"adapter {path}: a DoRA adapter (use_dora); ragkit loads plain LoRA adapters")
    try:
        with safe_open(weights, framework="pt") as f:
            keys = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        raise AdapterError(f"adapter {path}: {WEIGHTS_FILE} is damaged or not safetensors "
                           f"({type(exc).__name__}: {exc})") from exc
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in keys.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"adapter {path}: tensor {key!r} is not a LoRA matrix of a linear layer "
                               "(lora_A/lora_B); ragkit supports LoRA on linear layers only (no embedding "
                               "LoRA, modules_to_save or bias training)")
        shapes.setdefault(m["module"], {})[m["part"]] = shape
    if not shapes:
        raise AdapterError(f"adapter {path}: {WEIGHTS_FILE} holds no LoRA weights")
    for module, parts in shapes.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise AdapterError(f"adapter {path}: module {module} has only {sorted(parts)}; the file is truncated")
    return Adapter(path, config, sha256_file(weights), _json_sha256(config), shapes)


def read_adapters(adapter: AdapterArg) -> list[Adapter]:
    """Every adapter of ``adapter`` read and checked; the same directory twice is refused."""
    adapters = [read_adapter(p) for p in adapter_paths(adapter)]
    seen: dict[str, Path] = {}
    for a in adapters:
        if a.sha256 in seen:
            raise AdapterError(f"adapter {a.path}: the same weights as {seen[a.sha256]}; pass each adapter once")
        seen[a.sha256] = a.path
    return adapters


def check_against(adapters: Sequence[Adapter], model: Any, *, merge: bool = False, quantized: bool = False) -> None:
    """AdapterError unless every adapter fits ``model`` (loaded, or built on the meta device).

    Each targeted module must exist, be a linear layer (fused experts are not), and match the adapter's
    matrices: lora_A is (r, in_features), lora_B is (out_features, r). ``merge`` needs an unquantized base,
    whose 4/8-bit weights cannot hold the updates.
    """
    from torch import nn

    from ragkit.quant.experts import NF4Experts, expert_layout_for

    if adapters and merge and quantized:
        raise AdapterError(f"adapter {adapters[0].path}: merge needs an unquantized base (fp32/bf16); a 4/8-bit "
                           "base keeps the adapter as separate layers - load without merge")
    modules = dict(model.named_modules())
    for a in adapters:
        _check_target_names(a, modules)
        for name, parts in a.shapes.items():
            module = modules.get(name)
            if module is None:
                raise AdapterError(f"adapter {a.path}: it targets module {name}, which the base model has not "
                                   f"(its modules look like {_example_linear(modules)}); it was trained for "
                                   "another architecture")
            if isinstance(module, NF4Experts) or expert_layout_for(module) is not None:
                raise AdapterError(f"adapter {a.path}: it targets the fused MoE experts {name}; ragkit holds fused "
                                   "experts as packed NF4 blocks that take no adapter. Target attention and dense "
                                   "projections (q_proj, k_proj, v_proj, o_proj, shared experts)")
            if not isinstance(module, nn.Linear):
                raise AdapterError(f"adapter {a.path}: module {name} is a {type(module).__name__}, not a linear "
                                   "layer; ragkit supports LoRA on linear layers only")
            (r, fan_in), (fan_out, r_b) = parts["lora_A"], parts["lora_B"]
            if (fan_in, fan_out, r_b) != (module.in_features, module.out_features, r):
                raise AdapterError(
                    f"adapter {a.path}: module {name} has lora_A {parts['lora_A']} and lora_B {parts['lora_B']}, "
                    f"but the base's {name} is {module.in_features} -> {module.out_features} features (expected "
                    f"lora_A (r, {module.in_features}) and lora_B ({module.out_features}, r)); the adapter was "
                    "trained on a base of another size")


def attach(model: Any, adapters: Sequence[Adapter], *, merge: bool = False, quantized: bool = False) -> Any:
    """``model`` with the adapters' LoRA layers in it, all active (their updates add up); checked first.

    The transformers model comes back (PEFT's layers are injected in place), so everything that drives the
    model stays as it is. ``merge`` folds the updates into the weights (faster; refused on a quantized base,
    whose 4/8-bit weights cannot hold them).
    """
    if not adapters:
        return model
    from peft import PeftModel  # only with adapters: a plain load needs no PEFT installed

    check_against(adapters, model, merge=merge, quantized=quantized)
    names = [f"adapter{i}" for i in range(len(adapters))]
    try:
        peft_model = PeftModel.from_pretrained(model, adapters[0].path, adapter_name=names[0], is_trainable=False)
        for name, a in zip(names[1:], adapters[1:]):
            peft_model.load_adapter(a.path, adapter_name=name, is_trainable=False)
    except Exception as exc:
        raise AdapterError(f"adapter {adapters[0].path}: PEFT could not load it ({type(exc).__name__}: {exc})") from exc
    peft_model.base_model.set_adapter(names, inference_mode=True)
    if merge:
        return peft_model.merge_and_unload(adapter_names=names)
    return peft_model.get_base_model()


def _check_target_names(a: Adapter, modules: dict[str, Any]) -> None:
    """Every name in a list ``target_modules`` must end some module name of the base."""
    targets = a.config.get("target_modules")
    if not isinstance(targets, list):
        return  # a regex (str) or "all-linear": the weights' module names are checked instead
    leaves = {n.rsplit(".", 1)[-1] for n in modules} | set(modules)
    missing = sorted(t for t in targets if t not in leaves and not any(n.endswith("." + t) for n in modules))
    if missing:
        raise AdapterError(f"adapter {a.path}: target_modules {missing} are not modules of the base model "
                           f"(its linear layers are named like {_example_linear(modules)})")


def _example_linear(modules: dict[str, Any]) -> str:
    from torch import nn

    names = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)})
    return ", ".join(names[:8]) or "(none)"


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _json_sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
