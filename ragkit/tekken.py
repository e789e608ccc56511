"""Mistral's Tekken tokenizer family (``mistral-common``): the reasoning-capable tokenizer of the test models,
and how ragkit loads any ``tekken.json`` model directory.

Mistral-Small-4 ships its tokenizer as ``tekken.json`` (a v15 Tekken file: 131,072 tokens, of which 1,000 are
special, with ``[THINK]``/``[/THINK]`` and a ``[MODEL_SETTINGS]`` block carrying ``reasoning_effort``) beside
the Hugging Face files. No real weights are reachable here, so test models take the Tekken vocabulary that
``mistral-common`` ships (``mistral_common/data/tekken_240911.json``, the same 150k-rank BPE, 131k used) and
declare it v15 with the reasoning tokens and the ``none``/``high`` reasoning efforts (:func:`save_tokenizer`).

ragkit's prompts are text (chat template -> text -> exactly the ids the model sees, ragkit/prompts.py), and
transformers' ``MistralCommonBackend`` encodes text without its special tokens (``[INST]`` in text becomes
plain pieces), so a Tekken directory is loaded through transformers' Tekken -> ``tokenizers`` conversion with
the chat template ``mistral-common`` generates for the file (:func:`load_tokenizer`). Its ids equal
``MistralCommonBackend.apply_chat_template``'s (mistral-common's own encoder) for the same request:
tests/ragkit/test_tekken.py checks that, with and without reasoning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ragkit.errors import ModelLoadError
from ragkit.reasoning import BEGIN_THINK, EFFORTS, END_THINK

TEKKEN_FILE = "tekken.json"  # the name transformers and mistral-common look for in a model directory
SHIPPED_VOCABULARY = "tekken_240911.json"  # in mistral_common/data/
# special tokens after Tekken's first twenty (<unk> ... [TOOL_CONTENT]) in a reasoning (v15) file
_V15_SPECIALS = ("[ARGS]", "[CALL_ID]", BEGIN_THINK, END_THINK, "[MODEL_SETTINGS]", "[/MODEL_SETTINGS]")
_INSTALL = "pip install 'ragkit[mistral]' (mistral-common)"


def is_tekken(directory: str | Path) -> bool:
    """Whether a model directory carries a Tekken tokenizer (``tekken.json``)."""
    return (Path(directory) / TEKKEN_FILE).is_file()


def _mistral_common() -> Any:
    try:
        import mistral_common
    except ImportError:
        raise ModelLoadError(f"Tekken tokenizers need mistral-common; install it: {_INSTALL}") from None
    return mistral_common


def shipped_vocabulary() -> Path:
    """The Tekken file mistral-common ships (131k vocabulary; a v3 file without reasoning tokens)."""
    path = Path(_mistral_common().__file__).parent / "data" / SHIPPED_VOCABULARY
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed mistral-common; reinstall it: {_INSTALL}")
    return path


def reasoning_tekken(source: Path | None = None) -> dict[str, Any]:
    """The content of a v15 (reasoning) ``tekken.json`` over the vocabulary of ``source`` (default: the shipped
    one): Tekken's first special tokens, then ``[THINK]``, ``[/THINK]`` and the model-settings pair, and a
    ``reasoning_effort`` of ``none`` (the default) or ``high``."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = json.loads((source or shipped_vocabulary()).read_text(encoding="utf-8"))
    base = [str(getattr(t["token_str"], "value", t["token_str"])) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    data["special_tokens"] = [{"rank": i, "token_str": s, "is_control": True}
                              for i, s in enumerate([*base, *_V15_SPECIALS])]
    data["config"]["version"] = "v15"
    data["model_settings_builder"] = {"reasoning_effort": {"values": list(EFFORTS), "default": EFFORTS[0]}}
    return data


def save_tokenizer(directory: str | Path, *, source: Path | None = None) -> Any:
    """Write a reasoning Tekken tokenizer into a model ``directory`` as Mistral's repositories ship it:
    ``tekken.json`` plus the Hugging Face files (``tokenizer.json``, ``tokenizer_config.json``,
    ``chat_template.jinja``, the template mistral-common generates for the file). Returns the tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TEKKEN_FILE).write_text(json.dumps(reasoning_tekken(source)), encoding="utf-8")
    tokenizer = _convert(directory / TEKKEN_FILE)
    tokenizer.save_pretrained(directory)
    return tokenizer


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer of a Tekken model directory as ragkit's text prompts need it: its ``tokenizer.json``
    and chat template when present (read by ``tokenizers`` alone: mistral-common need not be installed), else
    converted from ``tekken.json`` (a template generated for it; that needs mistral-common)."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        _mistral_common()
        return _convert(directory / TEKKEN_FILE)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True, mistral_format=False)


def _convert(tekken_file: Path) -> Any:
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    return convert_tekken_tokenizer(str(tekken_file))
