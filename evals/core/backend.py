"""Which model answers a suite's cells: ragkit.LocalLLM in this process, or an OpenAI-compatible server.

Every suite takes the same flags (``--backend --base-url --tokenizer --concurrency --timeout``) and fields
of the same names in its settings (:class:`evals.core.settings.SuiteSettings`). ``backend`` and
``tokenizer`` are configuration (hashed into cell ids when the backend is a server); ``base_url``,
``concurrency`` and ``timeout`` are run control, so a run resumes against a restarted server at another
address or concurrency. See docs/serving.md. ``batch_size``
(``--batch-size``, with the model flags) is run control too: how many cells the in-process backend decodes
together (evals/core/decode.py), not what a cell measures; so is ``prefill_chunk`` (``--prefill-chunk``), the prompt
tokens fed per forward call. ``adapter`` (``--adapter``, LoRA directories on the local
model) is configuration by identity: the sha256 of each adapter's weights and config go into the hash, its path
does not; without an adapter the hash is what it was before adapters existed (docs/lora.md).
"""

from __future__ import annotations

from typing import Any, Callable

from evals.core.errors import SettingsError
from evals.core.targets import QUANTS, Target, adapter_hashes, load_served_target, load_target

BACKENDS = ("local", "openai")


def add_model_flags(add: Callable[..., Any]) -> None:
    """The flags that name the model under test, on an ``ArgumentParser.add_argument``."""
    add("--model", help="default (embedded SmolLM2-135M-Instruct), a local HF directory, a .gguf file or a cached hub id")
    add("--quant", choices=QUANTS, help="bitsandbytes quantization of the model (default none)")
    add("--dtype", help="weights dtype for unquantized models (default float32)")
    add("--device", help="cpu, cuda or auto (default: cuda when present, else cpu)")
    add("--adapter", nargs="+", help="LoRA adapter directories (PEFT, safetensors) on the model, all active; "
        "their identity (sha256 of weights and config) is part of the configuration hash")
    add("--reasoning", choices=("none", "high"), help="the chat template's reasoning_effort (Mistral-Small-4: "
        "none or high); the thinking between [THINK] and [/THINK] is stripped before scoring (raw_answer keeps "
        "it) and counts against --max-new-tokens (default +1024 with high)")
    add("--batch-size", type=int, help="cells of a group decoded together after their shared-prefix prefill "
        "(default 8 on CUDA, 1 on CPU); run control: cell ids do not depend on it")
    add("--prefill-chunk", type=int, help="prompt tokens fed per forward call, bounding activation memory (default: "
        "on CUDA the largest power of two up to 16384 that fits a quarter of the free memory; on CPU the whole "
        "prompt); run control")


def add_flags(add: Callable[..., Any]) -> None:
    """The backend flags, on an ``ArgumentParser.add_argument``."""
    add("--backend", choices=BACKENDS, help="local: ragkit.LocalLLM in this process (default); openai: an "
        "OpenAI-compatible server, e.g. vLLM or llama.cpp (docs/serving.md)")
    add("--base-url", help="openai: the server's API root, e.g. http://127.0.0.1:8000/v1 (default $RAGKIT_BASE_URL)")
    add("--tokenizer", help="openai: the served model's tokenizer: a directory, .gguf file or cached hub id "
        "(default: the served model name, if it resolves offline)")
    add("--concurrency", type=int, help="openai: cells in flight at once (default 1)")
    add("--timeout", type=float, help="openai: seconds one request may take before it is retried (default 300)")


def check(s: Any) -> None:
    """SettingsError for a backend setting that is unknown or contradicts another."""
    if s.backend not in BACKENDS:
        raise SettingsError(f"--backend {s.backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if s.concurrency < 1:
        raise SettingsError(f"--concurrency must be >= 1, got {s.concurrency}")
    if s.batch_size is not None and s.batch_size < 1:
        raise SettingsError(f"--batch-size must be >= 1, got {s.batch_size}")
    if s.prefill_chunk is not None and s.prefill_chunk < 1:
        raise SettingsError(f"--prefill-chunk must be >= 1 token, got {s.prefill_chunk}")
    if s.backend == "openai" and s.prefill_chunk is not None:
        raise SettingsError("--prefill-chunk applies to the in-process backend; a server schedules its own prefill")
    if s.backend == "local" and (s.concurrency > 1 or s.base_url or s.tokenizer):
        raise SettingsError("--concurrency, --base-url and --tokenizer need --backend openai; the in-process "
                            "backend shares each haystack's prefix and decodes --batch-size cells together")
    if s.backend == "openai" and s.batch_size is not None:
        raise SettingsError("--batch-size applies to the in-process backend; a server batches the requests that "
                            "--concurrency keeps in flight")
    if s.backend == "openai" and s.adapter:
        raise SettingsError("--adapter applies to the in-process backend; a server loads adapters on its own side")
    adapter_hashes(s.adapter)  # a missing or broken adapter fails now, before a run directory is touched
    if s.backend == "openai" and s.reasoning is not None:
        raise SettingsError("--reasoning applies to the in-process backend (its thinking is split off by token "
                            "ids); a server decodes the thinking markers away")
    if s.backend == "openai" and s.quant != "none":
        raise SettingsError("--quant applies to the in-process backend; a server quantizes on its own side")


def load(s: Any) -> Target:
    """The model under test that ``s`` names (fails fast when a server does not answer)."""
    if s.backend == "openai":
        return load_served_target(s.base_url, s.model, s.tokenizer, s.max_new_tokens, s.timeout)
    return load_target(s.model, s.quant, s.dtype, s.device, s.max_new_tokens, s.adapter, s.reasoning)
