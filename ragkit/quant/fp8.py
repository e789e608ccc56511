"""FP8 checkpoints: recognise their layout, dequantize tensor by tensor, and write test checkpoints.

ragkit reads the FP8 layouts transformers' ``finegrained_fp8`` integration loads
(``quantization_config.quant_method == "fp8"``): ``float8_e4m3fn`` (or ``e5m2``) weights with a
``weight_scale_inv`` (2-D ``.weight`` tensors) or ``<name>_scale_inv`` (fused 3-D experts) holding

- one scale per tensor (a scalar, ``[1]`` or ``[1, 1]``; per expert ``[E, 1, 1]``, or ``[E, 2, 1]``
  with one scale for the gate half and one for the up half), or
- a block grid ``[ceil(rows / bm), ceil(cols / bn)]`` (DeepSeek-V3 / Mistral style, 128x128 blocks),
  per expert ``[E, ceil(rows / bm), ceil(cols / bn)]``.

Scales may be float32/bfloat16, UE8M0 (``float8_e8m0fnu``) or UE8M0 exponents stored as uint8.
``activation_scale`` tensors (static activation quantization) are ignored: weights are
dequantized and activations run in the compute dtype. Anything else raises
:class:`~ragkit.errors.QuantizationError` naming the tensor and its layout.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ragkit.errors import QuantizationError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu, torch.uint8)
# Key suffixes of quantized formats ragkit does not read, and what produces them.
_FOREIGN_SUFFIXES = {
    ".weight_scale": "compressed-tensors / llm-compressor FP8 (weight_scale, not weight_scale_inv)",
    ".input_scale": "compressed-tensors / llm-compressor static activation scales",
    ".weight_zero_point": "compressed-tensors integer quantization",
    ".weight_packed": "compressed-tensors packed integer quantization",
    "_blocks": "MXFP4 (gpt-oss style)",
    ".qweight": "GPTQ / AWQ",
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class CheckpointFormat:
    """How a checkpoint's weights are stored: unquantized, or FP8 with an optional block size."""

    fp8: bool = False
    block_size: tuple[int, int] | None = None


def checkpoint_format(config, where: str) -> CheckpointFormat:
    """Read ``config.quantization_config``; raise naming the method if ragkit cannot stream it."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return CheckpointFormat()
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method != "fp8":
        raise QuantizationError(
            f"{where} is quantized with quant_method={method!r}; ragkit's NF4 loader streams unquantized "
            "(BF16/FP16/FP32) and FP8 (quant_method 'fp8', weight_scale_inv) checkpoints only. Use the "
            "original BF16 or FP8 release of the model."
        )
    if qc.get("expert_dtype", "fp8") != "fp8":
        raise QuantizationError(
            f"{where} stores its experts as {qc['expert_dtype']!r}; ragkit reads FP8 experts only."
        )
    block = qc.get("weight_block_size")
    return CheckpointFormat(fp8=True, block_size=tuple(block) if block else None)


def scale_key(weight_key: str) -> str:
    """The key of a weight's inverse scale, as transformers names it."""
    if weight_key.endswith(".weight"):
        return weight_key[: -len(".weight")] + ".weight_scale_inv"
    return weight_key + "_scale_inv"


def is_scale_key(key: str) -> bool:
    """True for the scale tensors that accompany FP8 weights (consumed with their weight)."""
    return key.endswith("_scale_inv") or key.endswith("activation_scale")


def check_known_key(key: str, where: str) -> None:
    """Raise for keys that belong to a quantization format ragkit does not read."""
    for suffix, what in _FOREIGN_SUFFIXES.items():
        if key.endswith(suffix):
            raise QuantizationError(
                f"{where}: tensor {key!r} belongs to {what}, a layout ragkit's FP8 loader does not read; "
                "it reads FP8 weights with weight_scale_inv (per-tensor or block-wise), as transformers' "
                "finegrained_fp8 does. Use the BF16 or 'fp8' release of the model."
            )


def _scale_to_float(scale: torch.Tensor, name: str) -> torch.Tensor:
    if scale.dtype == torch.uint8:  # UE8M0 exponents stored as bytes
        return torch.exp2(scale.to(torch.float32) - 127.0)
    if scale.dtype not in _SCALE_DTYPES:
        raise QuantizationError(f"Scale of {name!r} has dtype {scale.dtype}; expected float32/bf16/UE8M0.")
    return scale.to(torch.float32)


def _scale_grid(
    rows: int, cols: int, scale: torch.Tensor, block_size: tuple[int, int] | None, name: str, weight_desc: str
) -> tuple[torch.Tensor, int, int] | None:
    """(grid, block rows, block cols) of a block-wise scale, None for a per-tensor one; raises for anything else."""
    if scale.numel() == 1:
        return None
    grid = scale.reshape(-1, 1) if scale.dim() == 1 else scale
    if grid.dim() == 2:
        s_rows, s_cols = grid.shape
        if block_size is not None and (s_rows, s_cols) == (_cdiv(rows, block_size[0]), _cdiv(cols, block_size[1])):
            return grid, block_size[0], block_size[1]
        if rows % s_rows == 0 and cols % s_cols == 0:
            return grid, rows // s_rows, cols // s_cols
    raise QuantizationError(
        f"Unsupported FP8 layout for {name!r}: weight {weight_desc} [{rows}, {cols}] with scale "
        f"{list(scale.shape)} (weight_block_size={list(block_size) if block_size else None}). ragkit reads "
        "per-tensor scales and block grids [ceil(rows/bm), ceil(cols/bn)] as transformers' finegrained_fp8 "
        "does; re-export the checkpoint in one of those layouts or use its BF16 release."
    )


def check_layout(
    name: str, is_fp8: bool, shape: list[int], scale: torch.Tensor | None, block_size: tuple[int, int] | None
) -> None:
    """Validate one checkpoint tensor against its scale before anything is loaded (cheap: shapes only)."""
    if scale is None:
        if is_fp8:
            raise QuantizationError(
                f"FP8 tensor {name!r} has no {scale_key(name)!r}; ragkit cannot dequantize FP8 weights without "
                "their inverse scale (the layout transformers' finegrained_fp8 uses)."
            )
        return
    if not is_fp8:
        raise QuantizationError(
            f"Tensor {name!r} has a scale but is not float8_e4m3fn/e5m2; ragkit dequantizes FP8 weights only "
            "(packed FP4/INT8 experts are not supported)."
        )
    if len(shape) == 3:
        _scale_grid(shape[1], shape[2], expert_scale(scale, 0, shape[0], name), block_size, name, "fp8 expert")
    elif len(shape) == 2:
        _scale_grid(shape[0], shape[1], scale, block_size, name, "fp8")
    else:
        raise QuantizationError(f"FP8 tensor {name!r} has shape {shape}; ragkit reads 2-D weights and 3-D experts.")


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int] | None, name: str
) -> torch.Tensor:
    """Dequantize one 2-D FP8 matrix ``[rows, cols]`` with its per-tensor or block-grid inverse scale (float32)."""
    if weight.dtype not in FP8_DTYPES:
        check_layout(name, False, list(weight.shape), scale_inv, block_size)
    rows, cols = weight.shape
    scale = _scale_to_float(scale_inv, name)
    w = weight.to(torch.float32)
    blocks = _scale_grid(rows, cols, scale, block_size, name, str(weight.dtype))
    if blocks is None:
        return w.mul_(scale.reshape(()))
    grid, bm, bn = blocks
    return w.mul_(grid.repeat_interleave(bm, dim=0)[:rows].repeat_interleave(bn, dim=1)[:, :cols])


def expert_scale(scale_inv: torch.Tensor, expert: int, num_experts: int, name: str) -> torch.Tensor:
    """The scale (scalar or 2-D grid) of one expert out of a fused experts tensor's scale."""
    if scale_inv.numel() == 1:
        return scale_inv.reshape(())
    if scale_inv.dim() == 3 and scale_inv.shape[0] == num_experts:
        return scale_inv[expert]
    if scale_inv.numel() % num_experts == 0 and scale_inv.dim() <= 2:
        return scale_inv.reshape(num_experts, -1)[expert].reshape(-1, 1)
    raise QuantizationError(
        f"Unsupported FP8 layout for experts {name!r}: scale of shape {list(scale_inv.shape)} does not split "
        f"into {num_experts} experts; expected [E, rows/bm, cols/bn], [E, 1, 1] or [E, 2, 1]."
    )


def quantize_fp8(
    weight: torch.Tensor, block_size: tuple[int, int] | None, row_groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D or 3-D (experts-first) weight to ``float8_e4m3fn`` and its inverse scale.

    Block-wise when ``block_size`` is given (grid ``[..., ceil(rows/bm), ceil(cols/bn)]``), else
    per tensor: ``[]`` for 2-D, ``[E, row_groups, 1]`` for 3-D (``row_groups=2`` gives the gate and
    up halves of a fused ``gate_up_proj`` their own scale, as transformers' FP8Experts allocates).
    """
    w = weight.to(torch.float32)
    lead, (rows, cols) = w.shape[:-2], w.shape[-2:]
    if block_size is None:
        bm, bn = rows // row_groups, cols
    else:
        bm, bn = block_size
    pr, pc = _cdiv(rows, bm) * bm - rows, _cdiv(cols, bn) * bn - cols
    padded = torch.nn.functional.pad(w, (0, pc, 0, pr))
    blocks = padded.reshape(*lead, _cdiv(rows, bm), bm, _cdiv(cols, bn), bn)
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(padded.shape)[..., :rows, :cols].to(torch.float8_e4m3fn)
    if block_size is None and not lead:
        scale_inv = scale_inv.reshape(())
    return q.contiguous(), scale_inv.contiguous()


# Tensors a real FP8 release keeps in BF16 (embeddings, head, norms, router, vision tower).
_KEEP_BF16 = re.compile(r"embed_tokens|lm_head|norm|\.gate\.weight$|vision_tower|multi_modal_projector")


def stored_as_fp8(key: str, tensor: torch.Tensor) -> bool:
    """Whether an FP8 release stores this checkpoint tensor in FP8 (Linear weights and fused experts)."""
    return tensor.dim() in (2, 3) and tensor.is_floating_point() and not _KEEP_BF16.search(key)


def fp8_tensors(key: str, tensor: torch.Tensor, block_size: tuple[int, int] | None, activation_scheme: str) -> dict:
    """The checkpoint entries an FP8 release holds for one tensor: weight, inverse scale, activation scale."""
    if not stored_as_fp8(key, tensor):
        return {key: tensor}
    groups = 2 if tensor.dim() == 3 and key.endswith("gate_up_proj") else 1
    out = dict(zip((key, scale_key(key)), quantize_fp8(tensor, block_size, groups)))
    if activation_scheme == "static":
        act = key[: -len("weight")] + "activation_scale" if key.endswith(".weight") else key + "_activation_scale"
        out[act] = torch.ones(tensor.shape[0] if tensor.dim() == 3 else 1)
    return out


def fp8_config(block_size: tuple[int, int] | None, activation_scheme: str) -> dict:
    """The ``quantization_config`` entry of an FP8 release written by :func:`fp8_tensors`."""
    return {
        "quant_method": "fp8",
        "activation_scheme": activation_scheme,
        "weight_block_size": list(block_size) if block_size else None,
        "modules_to_not_convert": ["embed_tokens", "lm_head", "norm", "gate", "vision_tower", "multi_modal_projector"],
    }


def write_fp8_checkpoint(
    src: str | Path, dst: str | Path, block_size: tuple[int, int] | None, activation_scheme: str = "dynamic"
) -> Path:
    """Convert a BF16 safetensors checkpoint to FP8, shard by shard (used to build test checkpoints).

    Linear weights and fused experts become ``float8_e4m3fn`` with ``weight_scale_inv`` /
    ``<name>_scale_inv`` (block-wise or per-tensor), plus ``activation_scale`` tensors of 1.0 when
    ``activation_scheme="static"``; ``config.json`` gets the matching ``quantization_config``.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shards = sorted(src.glob("*.safetensors"))
    weight_map = {}
    for shard in shards:
        out = {}
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                out.update(fp8_tensors(key, f.get_tensor(key), block_size, activation_scheme))
        save_file(out, str(dst / shard.name), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in out})
    index = {"metadata": {"total_size": sum((dst / s.name).stat().st_size for s in shards)}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = fp8_config(block_size, activation_scheme)
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    for extra in src.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(extra, dst / extra.name)
    return dst
