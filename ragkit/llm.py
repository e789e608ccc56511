"""LocalLLM: a LlamaIndex LLM over a local transformers model.

Prompts go through the tokenizer's chat template and are tokenized once (no double BOS);
generation is greedy and deterministic unless a temperature is given; a prompt that does not
fit the context window raises instead of being truncated. Nothing here reads LlamaIndex's
global ``Settings``, so no OpenAI default is ever reached.
"""

from __future__ import annotations

import copy
import os
import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.generic_utils import (
    completion_response_to_chat_response,
    stream_completion_response_to_chat_response,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from ragkit import adapters as lora
from ragkit import loading, models, prompts, reasoning
from ragkit.errors import ContextWindowExceededError
from ragkit.structured import StructuredPredictMixin

_GENERATION_KWARGS = {"max_new_tokens", "temperature", "top_p", "stop", "json_schema"}


class LocalLLM(StructuredPredictMixin, CustomLLM):
    """A local transformers model behind the LlamaIndex LLM interface.

    ``model`` is ``"default"`` (the embedded SmolLM2-135M-Instruct), a Hugging Face id already
    in the local hub cache, a model directory, or a ``.gguf`` file. See docs/llm.md; structured (JSON-schema)
    answers: docs/structured.md.
    ``adapter``: one or several PEFT LoRA directories (safetensors), checked against the base before
    its weights load and all active at once; ``merge_adapter`` folds them into an unquantized base
    (docs/lora.md).
    """

    model_name: str = Field(description="What the model was loaded from.")
    context_window: int = Field(description="Tokens the model attends to: prompt plus generated tokens.")
    max_new_tokens: int = Field(default=256, description="Default generation budget per call.")
    temperature: float = Field(default=0.0, description="0 = greedy, deterministic decoding.")
    top_p: float = Field(default=1.0, description="Nucleus sampling mass when temperature > 0.")
    reasoning_effort: str | None = Field(default=None, description="The chat template's reasoning mode "
                                         "(none | high; None: the template's default), see ragkit/reasoning.py.")

    _model: Any = PrivateAttr()
    _tokenizer: Any = PrivateAttr()
    _adapters: list[lora.Adapter] = PrivateAttr(default_factory=list)
    _static: bool = PrivateAttr(default=False)

    def __init__(
        self,
        model: str | os.PathLike[str] = models.DEFAULT,
        *,
        tokenizer: Any = None,
        gguf_file: str | None = None,
        quantization: str | None = None,
        compute_dtype: str = "bfloat16",
        dtype: str | None = None,
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[int | str, int | str] | None = None,
        headroom: float = 0.12,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        system_prompt: str | None = None,
        trust_remote_code: bool = False,
        adapter: lora.AdapterArg = None,
        merge_adapter: bool = False,
        reasoning_effort: str | None = None,
    ) -> None:
        loading.check_quantization(quantization)
        adapters = lora.read_adapters(adapter)
        source = models.resolve_llm(model, gguf_file)
        directory = models.local_dir(source)
        if adapters:
            lora.check_against(adapters, loading.empty_model(directory, trust_remote_code=trust_remote_code),
                               merge=merge_adapter, quantized=quantization is not None)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tok_dir = directory if tokenizer is None else models.local_dir(models.resolve_llm(tokenizer))
            tokenizer = loading.load_tokenizer(tok_dir, trust_remote_code=trust_remote_code)
        reasoning.check(tokenizer, reasoning_effort)  # before the weights load
        hf_model = loading.load_model(
            directory,
            quantization=quantization,
            compute_dtype=compute_dtype,
            dtype=dtype,
            device_map=device_map,
            max_memory=max_memory,
            headroom=headroom,
            trust_remote_code=trust_remote_code,
        )
        hf_model = lora.attach(hf_model, adapters, merge=merge_adapter, quantized=quantization is not None)
        self._setup(
            hf_model,
            tokenizer,
            model_name=source.name if source.name != models.DEFAULT else models.DEFAULT_LLM_NAME,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            system_prompt=system_prompt,
            reasoning_effort=reasoning_effort,
        )
        self._adapters = adapters

    @classmethod
    def from_pretrained_objects(cls, model: Any, tokenizer: Any, *, model_name: str | None = None, **kw: Any) -> LocalLLM:
        """Wrap an already loaded transformers model and tokenizer (no files are read).

        ``kw``: max_new_tokens, temperature, top_p, system_prompt, reasoning_effort.
        """
        if "bitsandbytes" in sys.modules:  # a 4-bit model: keep shapes the packed CPU kernel cannot take off it
            from ragkit.quant.nf4 import set_cpu_packing

            set_cpu_packing(model)
        reasoning.check(tokenizer, kw.get("reasoning_effort"))
        llm = cls.__new__(cls)
        llm._setup(model, tokenizer, model_name=model_name or model.config.name_or_path or type(model).__name__, **kw)
        return llm

    def _setup(self, model: Any, tokenizer: Any, **fields: Any) -> None:
        CustomLLM.__init__(self, context_window=prompts.context_window(model), **fields)
        self._model = model.eval()
        self._tokenizer = tokenizer
        from ragkit import graph_decode
        from ragkit.attention import use_lower_right

        self._static = graph_decode.supported(model)
        if self._static:  # mask-free prefill on a cache, grouped decode attention, MLA on its latents
            use_lower_right(model)

    @classmethod
    def class_name(cls) -> str:
        return "ragkit_local_llm"

    # ------------------------------------------------------------ what it is

    @property
    def model(self) -> Any:
        """The transformers model."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer."""
        return self._tokenizer

    @property
    def adapters(self) -> list[dict[str, Any]]:
        """The identity of each LoRA adapter loaded on the base (empty without one)."""
        return [a.identity() for a in self._adapters]

    @property
    def device(self) -> Any:
        """The torch device that inputs go to."""
        return self._model.device

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            model_name=self.model_name,
        )

    # ------------------------------------------------------------ prompts and tokens

    def chat_prompt(self, messages: Sequence[ChatMessage] | str) -> str:
        """The chat-template text for ``messages`` (a str is one user message), generation prompt added.

        ``system_prompt`` is prepended as a system message unless the messages start with one.
        """
        return prompts.chat_prompt(self._tokenizer, messages, self.system_prompt, self.reasoning_effort)

    def encode_prompt(self, prompt_text: str) -> list[int]:
        """Exactly the ids the model sees for ``prompt_text``: one BOS if the tokenizer uses one, never two.

        Chat templates usually write the BOS token themselves, so the text is tokenized without
        special tokens and the BOS is added only when the text does not already start with it.
        """
        return prompts.encode_prompt(self._tokenizer, prompt_text)

    def count_tokens(self, text_or_messages: str | Sequence[ChatMessage]) -> int:
        """Tokens of raw text (no special tokens), or of the full templated prompt for messages."""
        if isinstance(text_or_messages, str):
            return len(self._tokenizer(text_or_messages, add_special_tokens=False)["input_ids"])
        return len(self.encode_prompt(self.chat_prompt(text_or_messages)))

    def check_fits(self, n_prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ContextWindowExceededError unless prompt + generation budget fit the context window."""
        if n_prompt_tokens + max_new_tokens > self.context_window:
            raise ContextWindowExceededError(n_prompt_tokens, self.context_window, max_new_tokens)

    # ------------------------------------------------------------ generation

    def generate_ids(self, input_ids: Sequence[int], **gen: Any) -> list[int]:
        """Generate from ``input_ids``; returns the new token ids only.

        ``gen``: max_new_tokens, temperature, top_p, stop (strings that end generation), json_schema (a
        pydantic model class or JSON-schema dict: decoding is constrained to one object of it, docs/structured.md).
        """
        import torch

        from ragkit import graph_decode

        args = self._generate_args(input_ids, gen)
        config = args["generation_config"]
        plain = "logits_processor" not in args and "tokenizer" not in args  # no JSON schema, no stop strings
        if self._static and plain and graph_decode.plain_greedy(config):
            # plain greedy on one GPU: decode steps replayed as a CUDA graph (ragkit.graph_decode), same tokens
            return graph_decode.greedy(self._model, input_ids, config.max_new_tokens, self._eos_ids())
        with torch.inference_mode():
            out = self._model.generate(**args)
        return out[0, len(input_ids) :].tolist()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Answer ``prompt`` (wrapped as a user message unless ``formatted``); kwargs as generate_ids."""
        ids = self.encode_prompt(prompt if formatted else self.chat_prompt(prompt))
        new_ids = self.generate_ids(ids, **kwargs)
        text = prompts.cut_at_stop(self._decode(new_ids), kwargs.get("stop"))
        budget = kwargs.get("max_new_tokens") or self.max_new_tokens
        ended = bool(new_ids) and new_ids[-1] in self._eos_ids()
        return CompletionResponse(text=text, additional_kwargs={
            "prompt_tokens": len(ids), "completion_tokens": len(new_ids),
            "finish_reason": "length" if len(new_ids) >= budget and not ended else "stop"})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Stream the answer; the final text equals what :meth:`complete` returns under greedy decoding."""
        ids = self.encode_prompt(prompt if formatted else self.chat_prompt(prompt))
        args = self._generate_args(ids, kwargs)
        return self._stream(args, kwargs.get("stop"))

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return completion_response_to_chat_response(self.complete(self.chat_prompt(messages), formatted=True, **kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        stream = self.stream_complete(self.chat_prompt(messages), formatted=True, **kwargs)
        return stream_completion_response_to_chat_response(stream)

    def _generate_args(self, input_ids: Sequence[int], gen: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``; checks the context window first."""
        import torch

        unknown = set(gen) - _GENERATION_KWARGS
        if unknown:
            raise TypeError(f"Unknown generation arguments {sorted(unknown)}; valid: {sorted(_GENERATION_KWARGS)}")
        max_new_tokens = gen.get("max_new_tokens") or self.max_new_tokens
        temperature = self.temperature if gen.get("temperature") is None else gen["temperature"]
        top_p = self.top_p if gen.get("top_p") is None else gen["top_p"]
        self.check_fits(len(input_ids), max_new_tokens)

        config = copy.deepcopy(self._model.generation_config)
        config.max_new_tokens = max_new_tokens
        config.do_sample = temperature > 0
        config.temperature, config.top_p, config.top_k = (temperature, top_p, None) if temperature > 0 else (None,) * 3
        if config.eos_token_id is None:
            config.eos_token_id = self._tokenizer.eos_token_id
        if config.pad_token_id is None:
            config.pad_token_id = self._tokenizer.pad_token_id or config.eos_token_id
        stops = prompts.stops(gen.get("stop"))
        if stops:
            config.stop_strings = stops
        ids = torch.tensor([list(input_ids)], device=self.device)
        args: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "generation_config": config}
        if gen.get("json_schema") is not None:
            from ragkit import structured

            args["logits_processor"] = [structured.logits_processor(
                self._tokenizer, self._model.config.get_text_config().vocab_size, gen["json_schema"], self._eos_ids())]
        if stops:
            args["tokenizer"] = self._tokenizer  # generate needs it to match stop strings
        return args

    def _eos_ids(self) -> list[int]:
        """The token ids that end generation (the generation config's, else the tokenizer's)."""
        eos = self._model.generation_config.eos_token_id
        eos = self._tokenizer.eos_token_id if eos is None else eos
        return [eos] if isinstance(eos, int) else list(eos or [])

    def _decode(self, ids: Sequence[int]) -> str:
        """The answer text of generated ids (in reasoning mode: what follows the thinking)."""
        if self.reasoning_effort is not None:
            return reasoning.split(self._tokenizer, ids).answer
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _stream(self, args: dict[str, Any], stop: str | Sequence[str] | None) -> CompletionResponseGen:
        """Run generate in a thread; yield text as it grows, holding back a possible stop-string prefix."""
        import torch

        streamer = _IdStreamer()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self._model.generate(**args, streamer=streamer)
            except BaseException as exc:  # re-raised in the consumer
                failure.append(exc)
            finally:
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        sent = ""
        new_ids: list[int] = []
        for ids in streamer:
            new_ids.extend(ids)
            text = self._decode(new_ids)
            safe = prompts.cut_at_stop(text, stop)
            if safe == text:
                safe = text[: len(text) - prompts.partial_stop(text, stop)]
            if safe.endswith("\ufffd"):  # an incomplete multi-byte character
                continue
            if len(safe) > len(sent) and safe.startswith(sent):
                yield CompletionResponse(text=safe, delta=safe[len(sent) :])
                sent = safe
        thread.join()
        if failure:
            raise failure[0]
        final = prompts.cut_at_stop(self._decode(new_ids), stop)
        if final != sent or not final:  # LlamaIndex needs at least one response, even an empty one
            yield CompletionResponse(text=final, delta=final[len(sent) :] if final.startswith(sent) else final)


class _IdStreamer:
    """A transformers streamer that hands the new token ids to an iterator (the prompt is skipped)."""

    _END = object()

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[list[int]]:
        while (item := self._queue.get()) is not self._END:
            yield item
