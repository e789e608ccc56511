"""Prompt text and ids shared by LocalLLM and OpenAICompatibleLLM: the chat template, one BOS, stop strings,
and the context length a config states."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole

from ragkit.errors import ModelLoadError


def chat_prompt(tokenizer: Any, messages: Sequence[ChatMessage] | str, system_prompt: str | None,
                reasoning_effort: str | None = None) -> str:
    """The chat-template text for ``messages`` (a str is one user message), generation prompt added.

    ``system_prompt`` is prepended as a system message unless the messages start with one;
    ``reasoning_effort`` goes to the template when set (ragkit/reasoning.py checks the template takes it).
    """
    if isinstance(messages, str):
        messages = [ChatMessage(role=MessageRole.USER, content=messages)]
    turns = [{"role": m.role.value, "content": m.content or ""} for m in messages]
    if system_prompt and (not turns or turns[0]["role"] != "system"):
        turns.insert(0, {"role": "system", "content": system_prompt})
    if tokenizer.chat_template is None:
        return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant: "
    extra = {} if reasoning_effort is None else {"reasoning_effort": reasoning_effort}
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True, **extra)


def encode_prompt(tokenizer: Any, prompt_text: str) -> list[int]:
    """Exactly the ids the model sees for ``prompt_text``: one BOS if the tokenizer uses one, never two.

    Chat templates usually write the BOS token themselves, so the text is tokenized without
    special tokens and the BOS is added only when the text does not already start with it.
    """
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos]:
        if ids[:1] != [bos]:
            ids = [bos, *ids]
    return ids


def stops(stop: str | Sequence[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else [s for s in stop or [] if s]


def cut_at_stop(text: str, stop: str | Sequence[str] | None) -> str:
    """``text`` up to the earliest stop string (which is not included)."""
    cut = min((i for s in stops(stop) if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def partial_stop(text: str, stop: str | Sequence[str] | None) -> int:
    """Length of the longest tail of ``text`` that could be the start of a stop string."""
    return max((n for s in stops(stop) for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def context_window(model: Any) -> int:
    """Context length from the (text) config of ``model``."""
    config = model.config.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelLoadError(
        f"The config of {model.config.name_or_path or type(model).__name__} states no context length "
        f"(max_position_embeddings); ragkit needs it to refuse prompts that do not fit."
    )
