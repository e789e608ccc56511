"""Schema-constrained JSON answers: the grammar that constrains decoding, and the check of what came back.

A schema is a pydantic model class or a JSON-schema dict. :func:`logits_processor` turns it into an xgrammar
grammar over the model's vocabulary (compiled once per schema and tokenizer, cached) and masks, at every
decoding step, the tokens that would leave the schema; the end-of-sequence token is allowed only once the
object is complete. The output is compact single-line JSON (``{"a": 1, "b": [2, 3]}``): no free whitespace,
so a small model cannot spend its budget on newlines. :func:`parse` turns the text into the validated
object, or raises :class:`StructuredOutputError` with the raw text — the grammar cannot prevent a budget
that runs out mid-object. Why xgrammar: docs/structured.md (measured against llguidance,
lm-format-enforcer and outlines).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from ragkit.errors import RagkitError

Schema = Union[type[BaseModel], dict[str, Any]]

_COMPILERS: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()


class StructuredOutputError(RagkitError):
    """The model's text is not an object of the schema; ``raw`` holds the text, never a half-parsed object."""

    def __init__(self, message: str, raw: str):
        super().__init__(message)
        self.raw = raw


def _xgrammar() -> Any:
    """xgrammar, or a StructuredOutputError with the install hint when it is missing."""
    try:
        import xgrammar
    except ImportError as exc:
        raise StructuredOutputError(
            "Structured (JSON-schema) answers need the grammar engine xgrammar: pip install 'ragkit[structured]' "
            "(scripts/setup.sh installs it without triton on CPU-only machines)."
        ) from exc
    return xgrammar


def json_schema(schema: Schema) -> dict[str, Any]:
    """The JSON schema (a dict) of a pydantic model class or of a schema dict (checked to be one)."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema()
    if isinstance(schema, dict):
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise StructuredOutputError(f"The JSON schema is invalid: {exc.message}. Fix the schema (see "
                                        f"https://json-schema.org) or pass a pydantic model class.", raw="") from exc
        return schema
    raise TypeError(f"A schema is a pydantic model class or a JSON-schema dict, got {type(schema).__name__}")


def instruction(schema: Schema) -> str:
    """The sentence that asks for the answer as one JSON object of ``schema`` (added to structured prompts)."""
    return ("Answer with only a JSON object, no other text, that matches this JSON schema: "
            + json.dumps(json_schema(schema), separators=(",", ":")))


def parse(text: str, schema: Schema, *, finish_reason: str | None = None, budget: int | None = None) -> Any:
    """The validated object in ``text``: a model instance for a model class, the parsed value for a dict schema.

    The whole text must be the object (surrounding whitespace aside). ``finish_reason="length"`` (the
    generation budget of ``budget`` tokens ran out) is named in the error, with what to do about it.
    """
    ran_out = (f" The generation budget{f' of {budget} tokens' if budget else ''} ran out before the object was "
               f"complete: raise max_new_tokens." if finish_reason == "length" else "")
    shown = text if len(text) <= 2000 else text[:2000] + "..."
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StructuredOutputError(f"The model's answer is not one JSON object ({exc.msg} at character {exc.pos})."
                                    f"{ran_out} Raw text: {shown!r}", raw=text) from exc
    try:
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            return schema.model_validate(value)
        from jsonschema import Draft202012Validator

        errors = sorted(Draft202012Validator(json_schema(schema)).iter_errors(value), key=lambda e: list(e.path))
        if errors:
            where = "/".join(map(str, errors[0].path)) or "the object"
            raise StructuredOutputError(f"The model's JSON does not match the schema at {where}: {errors[0].message}."
                                        f"{ran_out} Raw text: {shown!r}", raw=text)
        return value
    except ValidationError as exc:
        raise StructuredOutputError(f"The model's JSON does not match {schema.__name__}: "  # type: ignore[union-attr]
                                    f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}.{ran_out} Raw text: {shown!r}",
                                    raw=text) from exc


def compiled_grammar(tokenizer: Any, vocab_size: int, schema: Schema, stop_ids: Sequence[int] = ()) -> Any:
    """The xgrammar grammar of ``schema`` over ``tokenizer`` (compilers cached per tokenizer, grammars by xgrammar)."""
    xgr = _xgrammar()

    per_size = _COMPILERS.setdefault(tokenizer, {})
    if vocab_size not in per_size:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_ids) or None)
        per_size[vocab_size] = xgr.GrammarCompiler(info, max_threads=1)
    try:
        return per_size[vocab_size].compile_json_schema(json.dumps(json_schema(schema)), any_whitespace=False)
    except RuntimeError as exc:  # xgrammar names the unsupported keyword
        raise StructuredOutputError(f"The grammar engine (xgrammar) cannot compile this schema: {exc}. "
                                    f"Simplify the schema (see docs/structured.md, 'Schemas').", raw="") from exc


def logits_processor(tokenizer: Any, vocab_size: int, schema: Schema, stop_ids: Sequence[int] = ()) -> Any:
    """A fresh transformers LogitsProcessor (one per ``generate`` call) that keeps every row inside ``schema``."""
    return JsonLogitsProcessor(compiled_grammar(tokenizer, vocab_size, schema, stop_ids))


class JsonLogitsProcessor:
    """Masks logits to the tokens the grammar allows next, one grammar matcher per batch row.

    Called by ``generate`` (or a hand-written decode loop) with the ids so far and the next-token scores;
    the first call sees the prompt, each later call first feeds the matcher the token chosen last time.
    A row whose object is complete allows only end-of-sequence.
    """

    def __init__(self, grammar: Any):
        self._grammar = grammar
        self._matchers: list[Any] = []
        self._bitmask: Any = None
        self._prompt_len = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        xgr = _xgrammar()

        if not self._matchers:
            self._matchers = [xgr.GrammarMatcher(self._grammar) for _ in range(input_ids.shape[0])]
            self._bitmask = xgr.allocate_token_bitmask(input_ids.shape[0], self._grammar.tokenizer_info.vocab_size)
            self._prompt_len = input_ids.shape[1]
        elif input_ids.shape[1] > self._prompt_len:
            self._prompt_len = input_ids.shape[1]
            for row, matcher in enumerate(self._matchers):
                if not matcher.is_terminated():
                    matcher.accept_token(int(input_ids[row, -1]))
        for row, matcher in enumerate(self._matchers):
            if matcher.is_terminated():
                self._bitmask[row].fill_(-1)  # finished rows are padded by the caller; leave them alone
            else:
                matcher.fill_next_token_bitmask(self._bitmask, row)
        xgr.apply_token_bitmask_inplace(scores, self._bitmask.to(scores.device), vocab_size=scores.shape[-1])
        return scores


def from_response(response: Any, schema: Schema, budget: int | None = None) -> Any:
    """The validated object of a chat or completion response (its finish_reason names a budget that ran out)."""
    message = getattr(response, "message", None)
    text = (message.content if message is not None else response.text) or ""
    extra = {**(getattr(message, "additional_kwargs", None) or {}), **(getattr(response, "additional_kwargs", None) or {})}
    return parse(text.strip(), schema, finish_reason=extra.get("finish_reason"), budget=budget)


class StructuredPredictMixin:
    """LlamaIndex's structured-output API on a ragkit LLM, through constrained decoding.

    ``llm.structured_predict(Model, prompt)``, ``llm.as_structured_llm(Model)`` (which calls it) and their
    async/streaming forms: the prompt's messages get :func:`instruction` appended to the last one, the answer is
    decoded under the schema's grammar (``json_schema=`` generation argument) and returned as a validated
    ``Model``; :class:`StructuredOutputError` (with the raw text) if the budget ran out mid-object.
    """

    def structured_predict(self, output_cls: type[BaseModel], prompt: Any, llm_kwargs: dict[str, Any] | None = None,
                           **prompt_args: Any) -> Any:
        from llama_index.core.base.llms.types import ChatMessage

        messages = list(prompt.format_messages(llm=self, **prompt_args))
        last = messages[-1]
        messages[-1] = ChatMessage(role=last.role, content=f"{last.content or ''}\n\n{instruction(output_cls)}")
        gen = dict(llm_kwargs or {})
        response = self.chat(messages, json_schema=output_cls, **gen)  # type: ignore[attr-defined]
        return from_response(response, output_cls, gen.get("max_new_tokens") or self.max_new_tokens)  # type: ignore[attr-defined]

    async def astructured_predict(self, output_cls: type[BaseModel], prompt: Any,
                                  llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any) -> Any:
        return self.structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)

    def stream_structured_predict(self, output_cls: type[BaseModel], prompt: Any,
                                  llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any) -> Any:
        """One item, the complete validated object (a partial object would not validate)."""
        yield self.structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)

    async def astream_structured_predict(self, output_cls: type[BaseModel], prompt: Any,
                                         llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any) -> Any:
        async def one() -> Any:
            yield self.structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        return one()
