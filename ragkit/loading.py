"""How models are loaded: the quantization config (built once), weight checks, tokenizer, load_model.

:func:`load_model` is the one function that turns a Hugging Face directory (found by
:mod:`ragkit.models`) into a transformers model; NF4 models that stock bitsandbytes cannot give
4 bits (fused MoE experts, FP8 checkpoints) branch off to :mod:`ragkit.quant`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragkit import tekken
from ragkit.errors import ModelLoadError, QuantizationError
from ragkit.models import model_class
from ragkit.placement import max_memory_with_headroom

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "int8")  # the one list of quantization names; "none" is spelled None here


def check_quantization(quantization: str | None) -> str | None:
    """Validate a quantization name; anything but None, "nf4" or "int8" raises QuantizationError."""
    if quantization is None or quantization in QUANTIZATIONS:
        return quantization
    raise QuantizationError(
        f"Unknown quantization {quantization!r}. Valid values: None (no quantization), "
        + ", ".join(repr(q) for q in QUANTIZATIONS)
        + " (bitsandbytes 4-bit NF4 with double quantization, or 8-bit LLM.int8)."
    )


def quantization_config(quantization: str | None, compute_dtype: str = "bfloat16") -> Any:
    """The bitsandbytes config for ``quantization`` (None -> None); NF4 is :func:`ragkit.quant.nf4.bnb_nf4_config`,
    the one config the expert-aware loader uses too."""
    import torch
    from transformers import BitsAndBytesConfig

    if check_quantization(quantization) is None:
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    from ragkit.quant.nf4 import bnb_nf4_config

    return bnb_nf4_config(getattr(torch, compute_dtype))


def check_weights(directory: Path) -> list[Path]:
    """The safetensors files of ``directory``, each with a readable header; pickle-only dirs are refused."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        if pickles:
            raise ModelLoadError(
                f"{directory} holds only pickle weights ({', '.join(pickles)}); ragkit loads only safetensors or "
                f"GGUF, because unpickling can run arbitrary code. Convert them once where you trust the files "
                f"(`model.save_pretrained(dir, safe_serialization=True)`), then pass that directory."
            )
        raise ModelLoadError(f"{directory} has no *.safetensors weights; pass a model directory or a .gguf file.")
    for file in files:
        try:
            with safe_open(file, "pt"):
                pass
        except Exception as exc:
            raise ModelLoadError(
                f"The weight file {file} is corrupt or truncated ({exc}). Copy or download it again."
            ) from exc
    return files


def load_tokenizer(directory: Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``directory`` (a Tekken one as :func:`ragkit.tekken.load_tokenizer` loads it)."""
    from transformers import AutoTokenizer

    try:
        if tekken.is_tekken(directory):
            return tekken.load_tokenizer(directory)
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"Could not load a tokenizer from {directory}: {type(exc).__name__}: {exc}") from exc


def read_config(directory: Path, *, trust_remote_code: bool = False) -> Any:
    """The transformers config in ``directory``; ModelLoadError when it is missing or unreadable."""
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} has no config.json; it is not a Hugging Face model directory.")
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"Could not read {directory / 'config.json'}: {exc}. If the model needs its own code and you trust "
            f"it, pass trust_remote_code=True."
        ) from exc


def empty_model(directory: Path, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model of ``directory`` built on the meta device: its module tree and shapes, no weights read."""
    import torch

    config = read_config(directory, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return model_class(config).from_config(config, trust_remote_code=trust_remote_code)


def load_model(
    directory: Path,
    *,
    quantization: str | None = None,
    compute_dtype: str = "bfloat16",
    dtype: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    headroom: float = 0.12,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load the model in ``directory`` (config.json + safetensors) for text generation.

    ``device_map=None`` means "auto" when CUDA is present, else "cpu". With "auto", ``max_memory``
    defaults to :func:`max_memory_with_headroom`. ``dtype=None`` keeps the checkpoint's dtype, or
    uses ``compute_dtype`` for the layers bitsandbytes leaves unquantized.
    """
    import torch

    bnb = quantization_config(quantization, compute_dtype)
    config = read_config(directory, trust_remote_code=trust_remote_code)
    check_weights(directory)
    cls = model_class(config)
    if device_map is None:
        device_map = "auto" if torch.cuda.is_available() else "cpu"
    if device_map == "auto" and max_memory is None:
        max_memory = max_memory_with_headroom(headroom)
    # Dispatch point: quantization paths that stock from_pretrained cannot express (e.g. the
    # expert-aware NF4 for MoE models of ragkit.quant) branch off here.
    if quantization == "nf4":
        from ragkit.quant.loader import load_nf4, needs_ragkit_nf4

        if needs_ragkit_nf4(config):
            return load_nf4(directory, compute_dtype=getattr(torch, compute_dtype), device=device_map,
                            max_memory=max_memory)
    logger.info("Loading %s with %s (quantization=%s, device_map=%s)", directory, cls.__name__, quantization, device_map)
    try:
        model = cls.from_pretrained(
            directory,
            config=config,
            quantization_config=bnb,
            dtype=dtype or (compute_dtype if bnb is not None else "auto"),
            device_map=device_map,
            max_memory=max_memory,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
    except Exception as exc:
        raise ModelLoadError(f"Could not load the model in {directory}: {type(exc).__name__}: {exc}") from exc
    if quantization == "nf4":
        from ragkit.quant.nf4 import set_cpu_packing

        set_cpu_packing(model)
    return model
