"""Reasoning mode: the ``reasoning_effort`` a chat template takes (Mistral-Small-4: ``none`` or ``high``), and the
thinking a model writes between ``[THINK]`` and ``[/THINK]`` split off its answer.

The thinking is generated tokens like any other: it counts against the generation budget (``max_new_tokens``),
and an answer whose thinking never closed within that budget is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragkit.errors import InvalidSettingError

EFFORTS = ("none", "high")
BEGIN_THINK, END_THINK = "[THINK]", "[/THINK]"


def check(tokenizer: Any, effort: str | None) -> None:
    """InvalidSettingError unless ``tokenizer``'s chat template has a reasoning mode that takes ``effort``
    (None: no reasoning setting, nothing to check)."""
    if effort is None:
        return
    if effort not in EFFORTS:
        raise InvalidSettingError(f"reasoning effort {effort!r} is unknown; choose one of {', '.join(EFFORTS)}")
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "reasoning_effort" not in template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise InvalidSettingError(
            f"the chat template of {name} has no reasoning mode (it takes no reasoning_effort); drop the reasoning "
            "setting (--reasoning) or use a model whose template has one, such as Mistral-Small-4's")
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                      add_generation_prompt=True, reasoning_effort=effort)
    except Exception as exc:  # the template's own refusal (raise_exception) names what it accepts
        raise InvalidSettingError(f"the chat template refuses reasoning_effort={effort!r}: {exc}") from None


@dataclass(frozen=True)
class Reasoned:
    """A generation split at the end of its thinking."""

    answer: str  # the text after [/THINK] (the whole text when the model did not think; "" if it never stopped)
    raw: str  # everything generated, thinking markers included
    reasoning_tokens: int  # generated tokens up to and including [/THINK]
    closed: bool  # False: the budget ran out inside the thinking


def split(tokenizer: Any, ids: Sequence[int]) -> Reasoned:
    """Split generated ``ids`` into the thinking and the answer (by the ``[THINK]``/``[/THINK]`` token ids)."""
    ids = list(ids)
    begin, end = (tokenizer.convert_tokens_to_ids(t) for t in (BEGIN_THINK, END_THINK))
    raw = tokenizer.decode(ids, skip_special_tokens=False)
    if end in ids:
        cut = len(ids) - ids[::-1].index(end)
        return Reasoned(tokenizer.decode(ids[cut:], skip_special_tokens=True).strip(), raw, cut, True)
    if begin in ids:
        return Reasoned("", raw, len(ids), False)
    return Reasoned(tokenizer.decode(ids, skip_special_tokens=True), raw, 0, True)
