"""The one place the suites touch ragkit: the model under test (LocalLLM) and the RAG pipeline (Pipeline)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import ragkit
from evals.core.errors import SettingsError
from evals.core.rag_store import open_pipeline
from ragkit import reasoning
from ragkit.errors import InvalidSettingError
from ragkit.loading import QUANTIZATIONS

QUANTS = ("none", *QUANTIZATIONS)  # as the flags spell them


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary, special tokens and chat template (recorded in run.json so a
    comparison of two runs can tell that their prompts were the same tokens)."""
    blob = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens,
                       getattr(tokenizer, "chat_template", None)], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class LLMCodec:
    """The haystack Codec of a LocalLLM: its chat template and exactly the ids it feeds the model."""

    def __init__(self, llm: Any):
        self.llm = llm

    def render(self, user: str, answer_prefix: str = "") -> str:
        text = self.llm.chat_prompt(user)
        return text + (answer_prefix if text.endswith((" ", "\n")) or not answer_prefix else " " + answer_prefix)

    def encode(self, text: str) -> list[int]:
        return list(self.llm.encode_prompt(text))

    def encode_piece(self, text: str) -> list[int]:
        return list(self.llm.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Target:
    """A loaded model under test with what the runner needs from it."""

    llm: Any
    codec: LLMCodec
    info: dict[str, Any]
    served: bool = False  # True: an OpenAI-compatible server answers (no model in this process)

    @property
    def model(self) -> Any:
        return self.llm.model

    @property
    def context_window(self) -> int:
        return int(self.llm.context_window)

    @property
    def eos_ids(self) -> list[int]:
        ids = self.llm.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.llm.tokenizer.eos_token_id is not None:
            ids.append(self.llm.tokenizer.eos_token_id)
        return sorted(set(ids))

    def decode(self, ids: Sequence[int]) -> str:
        return self.llm.tokenizer.decode(list(ids), skip_special_tokens=True)

    def json_processor(self, schema: dict[str, Any]) -> Any:
        """A fresh logits processor that keeps one answer inside ``schema`` (ragkit.structured's xgrammar grammar)."""
        from ragkit import structured

        return structured.logits_processor(self.llm.tokenizer, self.model.config.get_text_config().vocab_size,
                                           schema, self.eos_ids)

    def answer_fields(self, ids: Sequence[int]) -> dict[str, Any]:
        """The row fields of generated ``ids``: ``answer`` (what is scored) and, in reasoning mode, the thinking
        stripped from it: ``raw_answer`` (everything generated), ``reasoning_tokens``, ``reasoning_closed``."""
        if getattr(self.llm, "reasoning_effort", None) is None:
            return {"answer": self.decode(ids)}
        r = reasoning.split(self.llm.tokenizer, ids)
        return {"answer": r.answer, "raw_answer": r.raw, "reasoning_tokens": r.reasoning_tokens,
                "reasoning_closed": r.closed}

    def generate_naive(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """The plain path: one ``generate`` call on the whole prompt (the reference for decode.py)."""
        return [t for t in self.llm.generate_ids(list(ids), max_new_tokens=max_new_tokens) if t not in self.eos_ids]


@dataclass(frozen=True)
class Grid:
    """A context grid as ``--plan`` projects it (ragkit.projection): the model and its quantization, the lengths,
    needle depths, seed count, whether controls run, the generation budget, the GPU (None: the present one) and
    whether every seed reads the same haystack."""

    model: str
    quant: str
    lengths: Sequence[int]
    depths: Sequence[float]
    seeds: int
    controls: bool
    max_new_tokens: int
    gpu: str | None
    shared_haystack: bool

    def rows(self) -> tuple[list[Any], str, str]:
        """The projection per length (LengthProjection rows), the GPU's short name and the planned quantization.
        Reads only the model's config."""
        from ragkit import projection
        from ragkit.placement import load_config
        from ragkit.planner import plan

        config, _ = load_config(self.model)
        name = projection.resolve_gpu(self.gpu)
        planned = plan(config, context=max(self.lengths), quant=self.quant)
        rows = projection.project_grid(planned, config, self.lengths, self.depths, self.seeds, self.controls,
                                       self.max_new_tokens, name, self.shared_haystack)
        return rows, name, planned.quant

    def text(self) -> tuple[str, list[int]]:
        """``--plan``: the projection as text, and the lengths that will not fit."""
        from ragkit import projection

        rows, name, planned_quant = self.rows()
        return projection.table(rows, name, planned_quant), [r.length for r in rows if not r.fits]

    def recorded(self, target: Target) -> dict[str, Any] | None:
        """What run.json records of the projection for a run on one CUDA GPU, so that the report puts it beside
        what was measured: the GPU, the factors' source and each length's projection. None for a served model,
        a model off CUDA or a GPU without measured factors."""
        from dataclasses import asdict

        from ragkit import projection
        from ragkit.errors import MemoryPlanError

        if target.served or next(target.model.parameters()).device.type != "cuda":
            return None
        try:
            rows, name, planned_quant = self.rows()
        except MemoryPlanError:
            return None
        return {"gpu": name, "factors": projection.factors(name, planned_quant).source,
                "lengths": [{**asdict(r), "seconds": r.seconds} for r in rows]}


def adapter_hashes(paths: Sequence[str]) -> list[dict[str, str]]:
    """The identity of each LoRA adapter that settings hash (sha256 of weights and config; not the path).
    SettingsError (naming the adapter and what is wrong) for one that cannot be used."""
    try:
        return [a.hashed() for a in ragkit.read_adapters(list(paths))]
    except ragkit.AdapterError as e:
        raise SettingsError(f"--adapter: {e}") from None


def load_target(model: str = "default", quant: str = "none", dtype: str | None = None,
                device: str | None = None, max_new_tokens: int = 32, adapter: Sequence[str] = (),
                reasoning_effort: str | None = None) -> Target:
    """Load the model under test through ragkit.LocalLLM (greedy decoding), with its LoRA adapters if any;
    ``reasoning_effort``: the chat template's reasoning mode (a template without one fails here)."""
    if quant not in QUANTS:
        raise SettingsError(f"--quant {quant!r} is unknown; choose one of {', '.join(QUANTS)}")
    quantization = None if quant == "none" else quant
    kwargs: dict[str, Any] = dict(quantization=quantization, max_new_tokens=max_new_tokens, temperature=0.0)
    if quantization is None:
        kwargs["dtype"] = dtype or "float32"
    else:
        kwargs["compute_dtype"] = dtype or "float32"
    if device:
        kwargs["device_map"] = device
    if adapter:
        kwargs["adapter"] = list(adapter)
    if reasoning_effort is not None:
        kwargs["reasoning_effort"] = reasoning_effort
    try:
        llm = ragkit.LocalLLM(model, **kwargs)
    except InvalidSettingError as e:
        raise SettingsError(f"--reasoning: {e}") from None
    return wrap(llm, model, quant)


def wrap(llm: Any, name: str = "default", quant: str = "none") -> Target:
    """A Target over an already loaded LocalLLM (tests share one model this way)."""
    m = llm.model
    info = {
        "name": name,
        "loaded_from": getattr(llm, "model_name", None),
        "architecture": (getattr(m.config, "architectures", None) or [type(m).__name__])[0],
        "quant": quant,
        "dtype": str(getattr(m, "dtype", "")).replace("torch.", ""),
        "device": str(llm.device),
        "context_window": int(llm.context_window),
        "parameters": sum(p.numel() for p in m.parameters()),
        "tokenizer_fingerprint": tokenizer_fingerprint(llm.tokenizer),
    }
    if getattr(llm, "adapters", None):
        info["adapters"] = llm.adapters  # path, sha256s, rank, alpha, target modules
    return Target(llm, LLMCodec(llm), info)


# A served cell whose response is malformed, empty or refused is recorded as an error, never scored.
CELL_ERRORS = (ragkit.BadServerResponseError, ragkit.ServerRequestError)


def load_served_target(base_url: str | None, model: str = "default", tokenizer: str | None = None,
                       max_new_tokens: int = 32, timeout: float = 300.0) -> Target:
    """The model under test behind an OpenAI-compatible server, through ragkit.OpenAICompatibleLLM (greedy).

    Fails fast (ragkit.ServerUnavailableError) when nothing answers at ``base_url``. The suites build
    token-exact prompts, so the served model's tokenizer must be on this machine (``tokenizer``, or the
    served model name when it resolves offline).
    """
    llm = ragkit.OpenAICompatibleLLM(base_url, None if model == "default" else model, tokenizer=tokenizer,
                                     max_new_tokens=max_new_tokens, temperature=0.0, timeout=timeout)
    if llm.tokenizer is None:
        raise SettingsError(f"the suites build token-exact prompts and need the tokenizer of {llm.model_name!r} on "
                            "this machine; pass --tokenizer (a model directory, a .gguf file or a cached hub id)")
    info = {"name": llm.model_name, "backend": "openai", "base_url": llm.base_url,
            "tokenizer": llm.tokenizer_source, "context_window": int(llm.context_window), "device": "server",
            "tokenizer_fingerprint": tokenizer_fingerprint(llm.tokenizer)}
    return Target(llm, LLMCodec(llm), info, served=True)


class Retriever:
    """Haystacks ingested through ragkit.Pipeline into FAISS indexes in the run directory; one embedder.
    ``table_prefix``: how a ``store`` server's tables are named (evals.core.rag_store)."""

    def __init__(self, chunk_tokens: int, top_k: int, store: str | None = None, table_prefix: str = "rag"):
        self.chunk_tokens, self.top_k, self.store, self.table_prefix = chunk_tokens, top_k, store, table_prefix
        self._embedder: Any = None

    def top_chunks(self, index_dir: Path, text: str, question: str) -> list[str]:
        """Ingest ``text`` (once per index_dir) and return the texts of the top-k chunks for ``question``."""
        index_dir.mkdir(parents=True, exist_ok=True)
        pipeline = open_pipeline(index_dir / "index", self.store, self.table_prefix, embed_model=self._embedder,
                                 chunk_tokens=self.chunk_tokens, top_k=self.top_k)
        self._embedder = pipeline.embed_model
        src = index_dir / "haystack.txt"
        if not src.exists() or src.read_text(encoding="utf-8") != text:
            src.write_text(text, encoding="utf-8")
        pipeline.ingest([src], show_progress=False)
        return [n.node.get_content() for n in pipeline.retrieve(question, top_k=self.top_k)]


def cache_dir() -> Path:
    """Where suites keep reusable derived data (passage embeddings, corpus indexes): ragkit's cache + evals/."""
    from ragkit import models

    return models.cache_dir() / "evals"


def load_embedder(name: str = "default") -> Any:
    """The embedder ragkit retrieves with (SentenceTransformerEmbedding; all-MiniLM-L6-v2 by default)."""
    from ragkit.embed import SentenceTransformerEmbedding

    return SentenceTransformerEmbedding(name)


def orderings() -> tuple[str, ...]:
    """Names of ragkit's chunk-ordering strategies (``ragkit.context.ORDERINGS``)."""
    from ragkit.context import ORDERINGS

    return tuple(ORDERINGS)


class CorpusRAG:
    """ragkit.Pipeline over corpus files in a persistent index (reused across runs): the top-k chunks of a
    question, and the exact prompt ragkit assembles from them with an ordering strategy (``table_prefix``: as
    :class:`Retriever`'s)."""

    def __init__(self, index_dir: Path, paths: Sequence[Path], llm: Any, chunk_tokens: int, embedder: Any = None,
                 store: str | None = None, table_prefix: str = "rag"):
        self.paths = list(paths)
        self.pipeline = open_pipeline(index_dir, store, table_prefix, llm=llm, embed_model=embedder,
                                      chunk_tokens=chunk_tokens)

    def ingest(self, show_progress: bool = True) -> Any:
        """Add what the index lacks (files already ingested are skipped by their hashes)."""
        return self.pipeline.ingest(self.paths, show_progress=show_progress)

    def retrieve(self, question: str, top_k: int) -> list[Any]:
        return self.pipeline.retrieve(question, top_k=top_k)

    def prompt(self, question: str, nodes: list[Any], ordering: str, output_cls: Any = None) -> tuple[str, Any]:
        """The chat prompt text ``Pipeline.query`` would send (with ``output_cls``, a JSON schema: its structured
        form), and ragkit's AssembledContext (chunks in prompt order)."""
        ctx = self.pipeline.assemble(question, nodes, ordering, output_cls)
        return self.pipeline.llm.chat_prompt(ctx.messages), ctx
