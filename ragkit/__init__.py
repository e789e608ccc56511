"""ragkit: offline-first retrieval-augmented generation over local, quantized LLMs.

Public names are imported lazily so that ``import ragkit`` stays fast and a missing
optional dependency only matters when the feature that needs it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ragkit.lazy import lazy_exports

from ragkit.quiet import filter_misleading_warnings

__version__ = "0.1.0"

filter_misleading_warnings()

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "LocalLLM": "ragkit.llm",
    "OpenAICompatibleLLM": "ragkit.remote",
    "Pipeline": "ragkit.pipeline",
    "plan": "ragkit.planner",
    "MemoryPlan": "ragkit.planner",
    "MemoryPlanError": "ragkit.errors",
    "RagkitError": "ragkit.errors",
    "ModelNotFoundError": "ragkit.errors",
    "ModelLoadError": "ragkit.errors",
    "QuantizationError": "ragkit.errors",
    "AdapterError": "ragkit.errors",
    "FinetuneError": "ragkit.errors",
    "read_adapters": "ragkit.adapters",
    "ContextWindowExceededError": "ragkit.errors",
    "IndexCorruptError": "ragkit.errors",
    "EmbedderMismatchError": "ragkit.errors",
    "IndexLockedError": "ragkit.errors",
    "IngestError": "ragkit.errors",
    "EmptyIndexError": "ragkit.errors",
    "IndexNotFoundError": "ragkit.errors",
    "InvalidQueryError": "ragkit.errors",
    "InvalidArgumentError": "ragkit.errors",
    "FaissVectorStore": "ragkit.store",
    "IndexDirectory": "ragkit.store",
    "ServerError": "ragkit.errors",
    "ServerUnavailableError": "ragkit.errors",
    "ServerRequestError": "ragkit.errors",
    "BadServerResponseError": "ragkit.errors",
    "StructuredOutputError": "ragkit.structured",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from ragkit.adapters import read_adapters  # noqa: F401
    from ragkit.errors import (  # noqa: F401
        AdapterError,
        BadServerResponseError,
        ContextWindowExceededError,
        EmbedderMismatchError,
        EmptyIndexError,
        FinetuneError,
        IndexCorruptError,
        IndexLockedError,
        IndexNotFoundError,
        IngestError,
        InvalidArgumentError,
        InvalidQueryError,
        MemoryPlanError,
        ModelLoadError,
        ModelNotFoundError,
        QuantizationError,
        RagkitError,
        ServerError,
        ServerRequestError,
        ServerUnavailableError,
    )
    from ragkit.llm import LocalLLM  # noqa: F401
    from ragkit.pipeline import Pipeline  # noqa: F401
    from ragkit.planner import MemoryPlan, plan  # noqa: F401
    from ragkit.remote import OpenAICompatibleLLM  # noqa: F401
    from ragkit.store import FaissVectorStore, IndexDirectory  # noqa: F401
    from ragkit.structured import StructuredOutputError  # noqa: F401


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
