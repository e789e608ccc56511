"""OpenAICompatibleLLM: a LlamaIndex LLM over an OpenAI-compatible server (vLLM, llama.cpp, transformers serve).

It is a drop-in for :class:`ragkit.llm.LocalLLM` where a model is served instead of loaded: the same
token-counting surface (``context_window``, ``count_tokens``, ``chat_prompt``, ``encode_prompt``,
``check_fits``) computed with the served model's own tokenizer, loaded locally or asked of the server's
``/tokenize`` endpoint (vLLM). Prompts are rendered with the chat template here and sent to
``/v1/completions``, so the tokens counted are the tokens served; every response's
``usage.prompt_tokens`` is compared with the local count and the difference is returned per call in
``response.additional_kwargs["prompt_tokens_mismatch"]``.

Transport is the ``openai`` client: bounded retries with exponential backoff on 408/409/429/5xx,
timeouts and dropped connections. A server that is down or a wrong base URL fails at construction,
within ``connect_timeout``. See docs/serving.md.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

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
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from ragkit import loading, models, prompts
from ragkit.errors import (
    BadServerResponseError,
    ContextWindowExceededError,
    InvalidArgumentError,
    ModelLoadError,
    ModelNotFoundError,
    RagkitError,
    ServerError,
    ServerRequestError,
    ServerUnavailableError,
)
from ragkit.structured import StructuredPredictMixin, json_schema

logger = logging.getLogger(__name__)

ENV_BASE_URL = "RAGKIT_BASE_URL"
ENV_MODEL = "RAGKIT_MODEL"
ENV_API_KEYS = ("RAGKIT_API_KEY", "OPENAI_API_KEY")
_warned_mismatch = threading.Event()  # the first mismatch is logged; every one is in the response
_GENERATION_KWARGS = {"max_new_tokens", "temperature", "top_p", "stop", "json_schema"}


class OpenAICompatibleLLM(StructuredPredictMixin, CustomLLM):
    """A model behind an OpenAI-compatible HTTP server, with LocalLLM's token-exact interface.

    ``base_url``: e.g. ``http://127.0.0.1:8000/v1`` (``$RAGKIT_BASE_URL``; ``/v1`` is added to a bare
    host). ``model``: the served model name (``$RAGKIT_MODEL``; None = the only model the server lists).
    ``tokenizer``: the served model's tokenizer, as a directory, ``.gguf`` file, cached hub id or
    ``"default"``; None = the served model name if it resolves offline, else the server's ``/tokenize``.
    ``prompt_format``: ``"text"`` sends the rendered prompt text, ``"ids"`` sends the local token ids
    (vLLM and llama.cpp accept them; then the server sees exactly the counted tokens).
    ``json_schema=`` (generation argument; ``structured_predict``, ``as_structured_llm``): the schema goes to
    the server as ``response_format`` (json_schema), and what comes back is validated here (docs/structured.md).
    """

    model_name: str = Field(description="The served model name sent with every request.")
    base_url: str = Field(description="The server's OpenAI API root, ending in /v1.")
    context_window: int = Field(description="Tokens the served model attends to: prompt plus generated tokens.")
    max_new_tokens: int = Field(default=256, description="Default generation budget per call.")
    temperature: float = Field(default=0.0, description="0 = greedy decoding.")
    top_p: float = Field(default=1.0, description="Nucleus sampling mass when temperature > 0.")
    timeout: float = Field(default=300.0, description="Seconds one request may take (each attempt).")
    connect_timeout: float = Field(default=3.0, description="Seconds to open a connection; also bounds the start-up probe.")
    max_retries: int = Field(default=3, description="Retries (exponential backoff 0.5 s .. 8 s) on 429/5xx/timeouts/dropped connections.")
    prompt_format: Literal["text", "ids"] = Field(default="text", description="Send prompts as text or as token ids.")
    tokenizer_source: str = Field(description="Where token counts come from: a local path or the server's /tokenize.")

    _client: Any = PrivateAttr()
    _tokenizer: Any = PrivateAttr(default=None)
    _tokenize_client: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        *,
        api_key: str | None = None,
        tokenizer: str | os.PathLike[str] | None = None,
        context_window: int | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        system_prompt: str | None = None,
        timeout: float = 300.0,
        connect_timeout: float = 3.0,
        max_retries: int = 3,
        prompt_format: Literal["text", "ids"] = "text",
        trust_remote_code: bool = False,
    ) -> None:
        import openai

        if prompt_format not in ("text", "ids"):
            raise InvalidArgumentError(f"prompt_format must be 'text' or 'ids', got {prompt_format!r}")
        url = _api_root(base_url or os.environ.get(ENV_BASE_URL))
        key = api_key or next((os.environ[k] for k in ENV_API_KEYS if os.environ.get(k)), None) or "EMPTY"
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=max_retries,
                               timeout=openai.Timeout(timeout, connect=connect_timeout))
        served = _served_models(client, url, connect_timeout)
        name = _pick_model(model or os.environ.get(ENV_MODEL), served, url)
        local_tok, source = _local_tokenizer(tokenizer, name, trust_remote_code)
        tokenize_client = None
        if local_tok is None:
            tokenize_client = _tokenize_endpoint(client, url, name, connect_timeout)
            source = f"server {url.removesuffix('/v1')}/tokenize"
        window = context_window or _served_context(served[name]) or _local_context(source, local_tok, trust_remote_code)
        if not window and tokenize_client is not None:
            window = _tokenize(tokenize_client, name, prompt="").get("max_model_len")
        if not window:
            raise ServerRequestError(
                f"The context window of {name!r} at {url} is unknown: the server does not report max_model_len and "
                f"the tokenizer {source} has no config.json. Pass context_window=<tokens>."
            )
        super().__init__(
            model_name=name, base_url=url, context_window=int(window), max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, system_prompt=system_prompt, timeout=timeout,
            connect_timeout=connect_timeout, max_retries=max_retries, prompt_format=prompt_format,
            tokenizer_source=source,
        )
        self._client = client
        self._tokenizer = local_tok
        self._tokenize_client = tokenize_client

    @classmethod
    def class_name(cls) -> str:
        return "ragkit_openai_compatible_llm"

    @property
    def tokenizer(self) -> Any:
        """The served model's tokenizer loaded locally, or None when counts come from the server."""
        return self._tokenizer

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.max_new_tokens,
                           is_chat_model=True, model_name=self.model_name)

    # ------------------------------------------------------------ prompts and tokens

    def chat_prompt(self, messages: Sequence[ChatMessage] | str) -> str:
        """The chat-template text for ``messages``, generation prompt added (as :meth:`LocalLLM.chat_prompt`)."""
        self._need_local_tokenizer("chat_prompt")
        with self._lock:
            return prompts.chat_prompt(self._tokenizer, messages, self.system_prompt)

    def encode_prompt(self, prompt_text: str) -> list[int]:
        """The ids the model sees for ``prompt_text`` (one BOS at most; the server's own ids without a local tokenizer)."""
        if self._tokenizer is None:
            return _tokenize(self._tokenize_client, self.model_name, prompt=prompt_text)["tokens"]
        with self._lock:
            return prompts.encode_prompt(self._tokenizer, prompt_text)

    def count_tokens(self, text_or_messages: str | Sequence[ChatMessage]) -> int:
        """Tokens of raw text (no special tokens), or of the full templated prompt for messages."""
        if self._tokenizer is not None:
            if isinstance(text_or_messages, str):
                with self._lock:
                    return len(self._tokenizer(text_or_messages, add_special_tokens=False)["input_ids"])
            return len(self.encode_prompt(self.chat_prompt(text_or_messages)))
        if isinstance(text_or_messages, str):
            return len(_tokenize(self._tokenize_client, self.model_name, prompt=text_or_messages,
                                 add_special_tokens=False)["tokens"])
        return len(_tokenize(self._tokenize_client, self.model_name, messages=self._turns(text_or_messages),
                             add_generation_prompt=True)["tokens"])

    def check_fits(self, n_prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ContextWindowExceededError unless prompt + generation budget fit the context window."""
        if n_prompt_tokens + max_new_tokens > self.context_window:
            raise ContextWindowExceededError(n_prompt_tokens, self.context_window, max_new_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens kept (what a prompt of these ids reads as)."""
        self._need_local_tokenizer("decode")
        with self._lock:
            return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    # ------------------------------------------------------------ generation

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Answer ``prompt`` (wrapped as a user message unless ``formatted``); kwargs: max_new_tokens, temperature, top_p, stop."""
        if not formatted and self._tokenizer is None:
            return self._chat_endpoint([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs)
        text = prompt if formatted else self.chat_prompt(prompt)
        return self._complete(self.encode_prompt(text), text if self.prompt_format == "text" else None, kwargs)

    def complete_ids(self, input_ids: Sequence[int], **kwargs: Any) -> CompletionResponse:
        """Answer a prompt given as token ids (the suites build exact prompts this way).

        With ``prompt_format="text"`` the ids are decoded to text for the server, and the server's
        ``usage.prompt_tokens`` shows whether it tokenized that text back to the same length.
        """
        ids = list(input_ids)
        return self._complete(ids, None if self.prompt_format == "ids" else self.decode(ids), kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Stream the answer; the last response carries the same additional_kwargs as :meth:`complete`."""
        text = prompt if formatted else self.chat_prompt(prompt)
        return self._stream(self.encode_prompt(text), text, kwargs)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """The answer; the per-call token record is in ``additional_kwargs`` (of the response and its message)."""
        if self._tokenizer is None:
            done = self._chat_endpoint(messages, kwargs)
        else:
            done = self.complete(self.chat_prompt(messages), formatted=True, **kwargs)
        response = completion_response_to_chat_response(done)
        response.additional_kwargs = dict(done.additional_kwargs)
        return response

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        stream = self.stream_complete(self.chat_prompt(messages), formatted=True, **kwargs)
        return stream_completion_response_to_chat_response(stream)

    def _request_args(self, n_prompt: int, gen: dict[str, Any]) -> dict[str, Any]:
        """Request fields shared by every endpoint (no prompt); checks the context window first."""
        unknown = set(gen) - _GENERATION_KWARGS
        if unknown:
            raise TypeError(f"Unknown generation arguments {sorted(unknown)}; valid: {sorted(_GENERATION_KWARGS)}")
        max_new_tokens = gen.get("max_new_tokens") or self.max_new_tokens
        self.check_fits(n_prompt, max_new_tokens)
        temperature = self.temperature if gen.get("temperature") is None else gen["temperature"]
        args: dict[str, Any] = {"model": self.model_name, "max_tokens": max_new_tokens, "temperature": temperature}
        if temperature > 0:
            args["top_p"] = self.top_p if gen.get("top_p") is None else gen["top_p"]
        if gen.get("stop"):
            args["stop"] = gen["stop"]
        if gen.get("json_schema") is not None:
            schema = json_schema(gen["json_schema"])
            # vLLM and llama.cpp read response_format (chat and completions); llama.cpp's completions also json_schema
            args["extra_body"] = {"response_format": {"type": "json_schema", "json_schema": {
                "name": str(schema.get("title") or "answer"), "schema": schema, "strict": True}}, "json_schema": schema}
        return args

    def _complete(self, ids: list[int], text: str | None, gen: dict[str, Any]) -> CompletionResponse:
        args = self._request_args(len(ids), gen)
        with self._errors("a completion"):
            resp = self._client.completions.create(prompt=ids if text is None else text, **args)
        choice = _first_choice(resp, self.base_url)
        answer = getattr(choice, "text", None)
        if not isinstance(answer, str):
            raise BadServerResponseError(f"{self.base_url} returned a completion without text: {_short(resp)}")
        usage = getattr(resp, "usage", None)
        return CompletionResponse(
            text=prompts.cut_at_stop(answer, gen.get("stop")),
            additional_kwargs=_usage_fields(len(ids), usage, getattr(choice, "finish_reason", None)),
        )

    def _stream(self, ids: list[int], text: str, gen: dict[str, Any]) -> CompletionResponseGen:
        args = self._request_args(len(ids), gen)
        prompt = ids if self.prompt_format == "ids" else text
        with self._errors("a streamed completion"):
            stream = self._client.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True},
                                                     **args)
        sent, usage, finish = "", None, None
        with self._errors("a streamed completion"):
            for chunk in stream:
                usage = getattr(chunk, "usage", None) or usage
                for choice in getattr(chunk, "choices", None) or []:
                    finish = getattr(choice, "finish_reason", None) or finish
                    delta = getattr(choice, "text", None) or ""
                    if delta:
                        sent += delta
                        yield CompletionResponse(text=prompts.cut_at_stop(sent, gen.get("stop")), delta=delta)
        yield CompletionResponse(text=prompts.cut_at_stop(sent, gen.get("stop")), delta="",
                                 additional_kwargs=_usage_fields(len(ids), usage, finish))

    def _chat_endpoint(self, messages: Sequence[ChatMessage], gen: dict[str, Any]) -> CompletionResponse:
        """/v1/chat/completions, templated by the server (used when no tokenizer is local)."""
        n_prompt = self.count_tokens(messages)
        args = self._request_args(n_prompt, gen)
        with self._errors("a chat completion"):
            resp = self._client.chat.completions.create(messages=self._turns(messages), **args)
        choice = _first_choice(resp, self.base_url)
        content = getattr(getattr(choice, "message", None), "content", None)
        if not isinstance(content, str):
            raise BadServerResponseError(f"{self.base_url} returned a chat completion without content: {_short(resp)}")
        return CompletionResponse(text=prompts.cut_at_stop(content, gen.get("stop")),
                                  additional_kwargs=_usage_fields(n_prompt, getattr(resp, "usage", None),
                                                                  getattr(choice, "finish_reason", None)))

    # ------------------------------------------------------------ helpers

    def _turns(self, messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
        turns = [{"role": m.role.value, "content": m.content or ""} for m in messages]
        if self.system_prompt and (not turns or turns[0]["role"] != "system"):
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        return turns

    def _need_local_tokenizer(self, what: str) -> None:
        if self._tokenizer is None:
            raise RagkitError(
                f"{what} needs the served model's tokenizer on this machine (counts now come from {self.tokenizer_source}). "
                f"Pass tokenizer=<model directory | .gguf file | cached hub id> to OpenAICompatibleLLM."
            )

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate the openai client's exceptions (raised after its retries) into ragkit errors."""
        with _translate(self.base_url, what, self.timeout, self.max_retries):
            yield


# ---------------------------------------------------------------- module helpers


def _api_root(base_url: str | None) -> str:
    """``http://host:port/v1`` from what the user gave; ``/v1`` is added to a bare host."""
    if not base_url:
        raise ServerRequestError(
            f"No server URL: pass base_url='http://HOST:PORT/v1' or set ${ENV_BASE_URL} (see docs/serving.md)."
        )
    url = base_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ServerRequestError(f"base_url {base_url!r} is not an http(s) URL; e.g. http://127.0.0.1:8000/v1")
    return url if "/" in url.split("://", 1)[1] else url + "/v1"


@contextmanager
def _translate(url: str, what: str, timeout: float, retries: int) -> Iterator[None]:
    import openai

    tried = f"after {retries + 1} attempt(s) with backoff" if retries else "(no retries)"
    try:
        yield
    except openai.APITimeoutError as exc:
        raise ServerUnavailableError(
            f"The server at {url} did not finish {what} within {timeout:g} s {tried}. It is overloaded or stuck; "
            f"raise timeout= (or --timeout), lower the concurrency, or check the server's log."
        ) from exc
    except openai.APIConnectionError as exc:
        raise ServerUnavailableError(
            f"Lost the server at {url} during {what} {tried} ({exc.__cause__ or exc}). Is it still running? "
            f"Restart it (docs/serving.md); a suite run resumes with --resume."
        ) from exc
    except openai.APIStatusError as exc:
        detail = _short(getattr(exc, "body", None) or exc.message)
        if exc.status_code == 429 or exc.status_code >= 500:
            raise ServerUnavailableError(
                f"The server at {url} kept failing {what} with HTTP {exc.status_code} {tried}: {detail}"
            ) from exc
        hint = " Set RAGKIT_API_KEY (or OPENAI_API_KEY) or pass api_key=." if exc.status_code in (401, 403) else ""
        raise ServerRequestError(f"The server at {url} refused {what} with HTTP {exc.status_code}: {detail}.{hint}") from exc
    except (openai.APIError, ValueError) as exc:  # a response that does not parse, an error event mid-stream
        raise BadServerResponseError(f"The server at {url} sent a malformed response to {what}: {exc}") from exc


def _served_models(client: Any, url: str, connect_timeout: float) -> dict[str, dict[str, Any]]:
    """GET /v1/models once, no retries, short timeouts: the fail-fast check of a server's presence."""
    import openai

    read_timeout = max(10.0, connect_timeout)
    probe = client.with_options(max_retries=0, timeout=openai.Timeout(read_timeout, connect=connect_timeout))
    try:
        with _translate(url, "GET /models", read_timeout, 0):
            try:
                listed = probe.models.list()
            except openai.NotFoundError as exc:
                raise ServerUnavailableError(
                    f"{url} answers but has no /models endpoint: it is not an OpenAI-compatible API root. The base "
                    f"URL usually ends in /v1 (vLLM, llama.cpp, transformers serve: http://HOST:PORT/v1)."
                ) from exc
    except ServerUnavailableError as exc:
        if isinstance(exc.__cause__, openai.APIConnectionError):
            raise ServerUnavailableError(
                f"No OpenAI-compatible server answers at {url} ({exc.__cause__.__cause__ or exc.__cause__}; "
                f"one try, {connect_timeout:g} s to connect). Start the server (docs/serving.md), or fix base_url "
                f"(${ENV_BASE_URL}, --base-url)."
            ) from exc.__cause__
        raise
    served = {m.id: (m.model_dump() if hasattr(m, "model_dump") else dict(m)) for m in getattr(listed, "data", None) or []}
    if not served:
        raise ServerUnavailableError(f"The server at {url} lists no models (GET /models is empty); is it still loading?")
    return served


def _pick_model(model: str | None, served: dict[str, Any], url: str) -> str:
    if model is None:
        if len(served) == 1:
            return next(iter(served))
        raise ServerRequestError(f"The server at {url} serves {len(served)} models ({', '.join(served)}); pass model=.")
    if model not in served:
        raise ServerRequestError(
            f"The server at {url} does not serve {model!r}; it serves: {', '.join(served)}. Pass one of these as model=."
        )
    return model


def _local_tokenizer(tokenizer: Any, served_name: str, trust_remote_code: bool) -> tuple[Any, str]:
    """(tokenizer, where from) for an explicit ``tokenizer``, else for the served name if it resolves offline."""
    if tokenizer is None:
        try:
            source = models.resolve_llm(served_name)
        except ModelNotFoundError:
            return None, ""
    else:
        source = models.resolve_llm(tokenizer)
    if source.is_gguf and not (models.gguf_cache_path(source.path) / "config.json").is_file():
        return _gguf_tokenizer(source.path), str(source.path)  # never dequantize a served model just to count
    directory = models.local_dir(source)
    return loading.load_tokenizer(directory, trust_remote_code=trust_remote_code), str(directory)


def _gguf_tokenizer(gguf: Path) -> Any:
    """The tokenizer stored in a GGUF file's metadata (the weights are not read)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"Could not read a tokenizer from the GGUF file {gguf}: {type(exc).__name__}: {exc}") from exc


def _local_context(source: str, tokenizer: Any, trust_remote_code: bool) -> int | None:
    """max_position_embeddings from the config.json beside a local tokenizer, if there is one."""
    if tokenizer is None or not (Path(source) / "config.json").is_file():
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True)
    return prompts.context_window(SimpleNamespace(config=config))


def _served_context(entry: dict[str, Any]) -> int | None:
    """The context length a server states in its /v1/models entry (vLLM: max_model_len; llama.cpp: meta.n_ctx_train)."""
    value = entry.get("max_model_len") or (entry.get("meta") or {}).get("n_ctx_train")
    return int(value) if isinstance(value, int) and value > 0 else None


def _tokenize_endpoint(client: Any, url: str, model: str, connect_timeout: float) -> Any:
    """A client for the server's /tokenize (vLLM); raises if there is none and no tokenizer was given."""
    import openai

    root = client.with_options(base_url=url.removesuffix("/v1"),
                               timeout=openai.Timeout(max(30.0, connect_timeout), connect=connect_timeout))
    try:
        _tokenize(root, model, prompt="ragkit")
    except ServerError as exc:
        raise ServerRequestError(
            f"ragkit needs the served model's tokenizer to count prompt tokens exactly, and the server at {url} has no "
            f"usable /tokenize endpoint ({exc}). Pass tokenizer=<model directory | .gguf file | cached hub id>."
        ) from exc
    return root


def _tokenize(client: Any, model: str, **body: Any) -> dict[str, Any]:
    """POST /tokenize (vLLM's schema: prompt or messages in, tokens + count + max_model_len out)."""
    with _translate(str(client.base_url), "POST /tokenize", float(client.timeout.read or 0), client.max_retries):
        out = client.post("/tokenize", body={"model": model, **body}, cast_to=object)
    if not isinstance(out, dict) or not isinstance(out.get("tokens"), list):
        raise BadServerResponseError(f"{client.base_url}tokenize answered without a token list: {_short(out)}")
    return out


def _first_choice(resp: Any, url: str) -> Any:
    choices = getattr(resp, "choices", None)
    if not choices:
        raise BadServerResponseError(f"The server at {url} returned a response without choices: {_short(resp)}")
    return choices[0]


def _usage_fields(n_local: int, usage: Any, finish_reason: str | None) -> dict[str, Any]:
    """The per-call token record: local vs served prompt tokens and their difference (None if unreported)."""
    served = getattr(usage, "prompt_tokens", None)
    served = served if isinstance(served, int) else None
    mismatch = None if served is None else served - n_local
    if mismatch and not _warned_mismatch.is_set():
        _warned_mismatch.set()
        logger.warning("The server counted %d prompt tokens where ragkit counted %d (%+d); the served tokenizer or "
                       "its special tokens differ from the local one (see docs/serving.md, 'Exact token counts'). "
                       "Each response's additional_kwargs['prompt_tokens_mismatch'] records it.", served, n_local,
                       mismatch)
    completion = getattr(usage, "completion_tokens", None)
    return {"prompt_tokens": n_local, "server_prompt_tokens": served, "prompt_tokens_mismatch": mismatch,
            "completion_tokens": completion if isinstance(completion, int) else None, "finish_reason": finish_reason}


def _short(obj: Any, limit: int = 300) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."

