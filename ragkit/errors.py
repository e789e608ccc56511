"""Errors raised by ragkit. Every message names the input at fault and says what to do."""

from __future__ import annotations


class RagkitError(Exception):
    """Base class of every error ragkit raises on purpose."""


class ModelNotFoundError(RagkitError):
    """A model id or path could not be resolved offline."""


class ModelLoadError(RagkitError):
    """Model files were found but could not be loaded (corrupt, truncated, unsupported)."""


class QuantizationError(RagkitError):
    """An unknown quantization was asked for, or it cannot be applied to this model."""


class AdapterError(RagkitError):
    """A LoRA adapter cannot be used: missing or not safetensors, damaged, or made for another base model."""


class FinetuneError(RagkitError):
    """Training data, finetune settings or the output directory cannot be used as asked."""


class ContextWindowExceededError(RagkitError):
    """A prompt (plus its generation budget) does not fit the model's context window."""

    def __init__(self, prompt_tokens: int, context_window: int, max_new_tokens: int = 0, what: str = "prompt"):
        self.prompt_tokens = prompt_tokens
        self.context_window = context_window
        self.max_new_tokens = max_new_tokens
        budget = f" + {max_new_tokens} tokens of generation budget" if max_new_tokens else ""
        super().__init__(
            f"The {what} has {prompt_tokens} tokens{budget}, but the model's context window is "
            f"{context_window} tokens. Shorten the input, lower max_new_tokens, or use a model with a "
            f"longer context window; ragkit never truncates silently."
        )


class IndexError_(RagkitError):
    """Base class of index-directory errors (named with a trailing underscore to not shadow IndexError)."""


class IndexCorruptError(IndexError_):
    """An index directory is corrupt or partial."""


class EmbedderMismatchError(IndexError_):
    """An index was opened with an embedder other than the one that built it."""


class IndexLockedError(IndexError_):
    """Another process holds the index directory's write lock."""


class IndexNotFoundError(IndexError_):
    """An index directory has no index yet (no CURRENT pointer)."""


class InvalidQueryError(RagkitError, ValueError):
    """A query cannot be run as asked (top_k < 1, wrong embedding dimension, unsupported filter)."""


class InvalidArgumentError(RagkitError, ValueError):
    """An argument of a ragkit function or command is not one it accepts (the message lists what it does)."""


class MemoryPlanError(RagkitError, ValueError):
    """A memory plan cannot be made: bad planner input, or the model does not fit the given GPUs."""


class IngestError(RagkitError):
    """An input could not be ingested."""


class EmptyIndexError(IndexError_):
    """A search was asked of an index that holds no chunks yet."""


class ServerError(RagkitError):
    """Base class of errors talking to an OpenAI-compatible model server."""


class ServerUnavailableError(ServerError):
    """The server cannot be reached, or kept failing (5xx, timeouts) after the bounded retries; stop the run."""


class ServerRequestError(ServerError):
    """The server refused a request (4xx: wrong model name, API key, prompt too long for it)."""


class BadServerResponseError(ServerError):
    """The server answered with a malformed or empty response; suites record it per cell as an error."""


class IndexReadOnlyError(IndexError_):
    """An index directory cannot be written (permissions, read-only filesystem); nothing was changed."""


class InvalidSettingError(RagkitError, ValueError):
    """A setting is out of range (e.g. --chunk-tokens), or differs from the one an index was built with."""
