"""Typed settings (pydantic) behind both the flags and the YAML suite files of every suite.

A suite's settings are a :class:`SuiteSettings` subclass: each field and its default are written once,
there; an unknown key is refused (``extra="forbid"``) with a SettingsError that names it and the valid
ones, and a value of the wrong type with one that names the setting. The backend fields (``--backend
--base-url --tokenizer --concurrency --timeout --batch-size``) live here because every suite has them;
what they mean is :mod:`evals.core.backend`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from evals.core import answers
from evals.core.errors import SettingsError
from evals.core.targets import adapter_hashes
from ragkit.store.url import redact_url

# fields that do not change what a cell measures (left out of the configuration hash)
BACKEND_RUN_CONTROL = ("base_url", "concurrency", "timeout", "batch_size", "prefill_chunk")
REASONING = ("none", "high")  # --reasoning: the chat template's reasoning_effort (ragkit.reasoning.EFFORTS)
THINKING_BUDGET = 1024  # tokens added to a suite's default --max-new-tokens under --reasoning high


class SuiteSettings(BaseModel):
    """The backend fields every suite's settings inherit, the hash of the settings, and readable errors."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    backend: str = "local"
    tokenizer: str | None = None  # openai: the served model's tokenizer
    base_url: str | None = None  # run control from here on
    concurrency: int = 1
    timeout: float = 300.0
    batch_size: int | None = None  # local: cells decoded together (None: 8 on CUDA, 1 on CPU)
    prefill_chunk: int | None = None  # local: prompt tokens per forward call (None: sized from free GPU memory)
    adapter: tuple[str, ...] = ()  # local: LoRA adapter directories on the model (hashed by identity)
    answer_format: str = "text"  # json: the answer is one JSON object of the suite's schema (evals/core/answers.py)
    constrained: str = "no"  # json: yes = decoded under the schema's grammar; both = free and constrained cells
    reasoning: str | None = None  # local: the template's reasoning_effort (none | high); None: not set

    RUN_CONTROL: ClassVar[tuple[str, ...]] = BACKEND_RUN_CONTROL
    RECIPE_VERSION: ClassVar[int] = 1  # bump when prompt construction changes: old runs then refuse to resume
    LABEL: ClassVar[str] = "settings"  # how errors name these settings ("needle settings", ...)

    def __init__(self, **data: Any) -> None:
        unknown = sorted(set(data) - set(type(self).model_fields))
        if unknown:
            raise SettingsError(f"unknown {self.LABEL} {unknown}; valid: {sorted(type(self).model_fields)}")
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise SettingsError(explain(e)) from e

    @field_validator("adapter", mode="before")
    @classmethod
    def _adapter_paths(cls, value: Any) -> tuple[str, ...]:
        """One directory (a str, as a suite file may give it) or several, as a tuple of str."""
        if value is None or isinstance(value, str):
            return (value,) if value else ()
        return tuple(str(p) for p in value) if isinstance(value, (list, tuple)) else value  # else: pydantic's error

    @field_validator("constrained", mode="before")
    @classmethod
    def _constrained(cls, value: Any) -> Any:
        """A suite file's ``constrained: true/false`` as the flag's yes/no."""
        return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _answer_format(self) -> "SuiteSettings":
        answers.check(self.answer_format, self.constrained)
        return self

    @field_validator("reasoning")
    @classmethod
    def _reasoning(cls, value: str | None) -> str | None:
        if value is not None and value not in REASONING:
            raise SettingsError(f"--reasoning {value!r} is unknown; choose one of {', '.join(REASONING)}")
        return value

    def answer_budget(self, answer_tokens: int) -> int:
        """The default generation budget: ``answer_tokens``, plus THINKING_BUDGET when the model reasons
        (its thinking is generated tokens too)."""
        return answer_tokens + (THINKING_BUDGET if self.reasoning == "high" else 0)

    @classmethod
    def fields(cls) -> set[str]:
        """The names of every setting (what a suite file or a regress entry may set)."""
        return set(cls.model_fields)

    def hashed(self) -> dict[str, Any]:
        """The settings that define the cells (run control left out), for the configuration hash.

        Without the backend keys when local, so that runs made before the server backend existed keep
        their cell ids; adapters by identity (sha256 of weights and config, not their paths), and no
        ``adapter`` key without one, so runs made before adapters existed keep theirs too; likewise no
        ``store`` key for FAISS, a server's URL without its password, no ``reasoning`` key unless set, and
        ``answer_format`` and ``constrained`` only when not text / no, so runs made before JSON answers keep theirs.
        """
        d = self.model_dump()
        for k in self.RUN_CONTROL:
            d.pop(k)
        if d["reasoning"] is None:
            del d["reasoning"]
        if d.pop("adapter"):
            d["adapter"] = adapter_hashes(self.adapter)
        d["recipe_version"] = self.RECIPE_VERSION
        for key, default in (("answer_format", "text"), ("constrained", "no")):
            if d[key] == default:
                del d[key]
        if d.get("backend") == "local":
            d = {k: v for k, v in d.items() if k not in ("backend", "tokenizer")}
        if "store" in d:  # FAISS (None) as before --store existed; a server by its URL less the password
            if d["store"] is None:
                del d["store"]
            else:
                d["store"] = redact_url(d["store"])
        return d


def explain(error: ValidationError) -> str:
    """A pydantic error as one line per bad setting: ``--name: what is wrong (got value)``."""
    lines = []
    for e in error.errors():
        flag = "--" + (".".join(str(p) for p in e["loc"]) or "settings").replace("_", "-")
        if e["type"] == "missing":
            lines.append(f"{flag} is required")
        else:
            lines.append(f"{flag}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)
