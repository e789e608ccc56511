"""Grammar engines for schema-constrained JSON on CPU: correctness on the schema set and per-token decode overhead.

Engines: xgrammar, llguidance, lm-format-enforcer, outlines (outlines_core backend), each plugged into
``model.generate`` the way its own transformers integration does, on the embedded SmolLM2 fp32. For every
schema: the constrained answer parses and validates (jsonschema), grammar compile seconds, and decode seconds
per token (median of ``--runs``; the time from the first to the last new token, so no prefill), as a ratio
to unconstrained decoding of the same prompt. Then the chosen engine (ragkit.structured, xgrammar) at long
prompts: a passcode needle at ``--lengths`` tokens of SQLite documentation, free vs constrained: JSON-valid,
found, and the per-token ratio.

    python benchmarks/structured_engines.py                          # writes benchmarks/results/structured_engines.{json,md}
    python benchmarks/structured_engines.py --runs 1 --engines xgrammar --lengths 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from tqdm import tqdm

from evals.core.answers import first_object, json_checks

from ragkit import structured
from ragkit.llm import LocalLLM

RESULTS = Path(__file__).parent / "results"
SQLITE = Path(__file__).parents[1] / "corpora" / "sqlite"

SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "flat": ("Describe the SQLite database engine.", {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "year": {"type": "integer"},
                                         "open_source": {"type": "boolean"}},
        "required": ["name", "year", "open_source"], "additionalProperties": False}),
    "nested": ("Give the author of SQLite and where they live.", {
        "type": "object", "properties": {"author": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 20}, "city": {"type": "string", "maxLength": 20}},
            "required": ["name", "city"], "additionalProperties": False}},
        "required": ["author"], "additionalProperties": False}),
    "list_of_objects": ("List two SQL commands with a short description each.", {
        "type": "object", "properties": {"commands": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                             "description": {"type": "string", "maxLength": 30}},
            "required": ["name", "description"], "additionalProperties": False}}},
        "required": ["commands"], "additionalProperties": False}),
    "enum": ("Is SQLite a server or an embedded library?", {
        "type": "object", "properties": {"kind": {"enum": ["server", "embedded library", "cloud service"]}},
        "required": ["kind"], "additionalProperties": False}),
    "ranges": ("Rate SQLite from 1 to 5 and give its market share as a fraction.", {
        "type": "object", "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                                         "share": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["stars", "share"], "additionalProperties": False}),
    "optional": ("Name a database and, if you know it, its license.", {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                         "license": {"type": "string", "maxLength": 20}},
        "required": ["name"], "additionalProperties": False}),
}
PASSCODE = {"type": "object", "properties": {"passcode": {"type": "string", "pattern": "^[0-9]{1,12}$"}},
            "required": ["passcode"], "additionalProperties": False}


# ---------------------------------------------------------------- engines: schema -> fresh generate kwargs


def xgrammar_engine(llm: LocalLLM, vocab: int) -> Callable[[dict], dict]:
    return lambda schema: {"logits_processor": [structured.logits_processor(llm.tokenizer, vocab, schema,
                                                                            llm._eos_ids())]}


class _LLGuidanceProcessor:
    """llguidance's documented torch path: LLMatcher + fill_next_token_bitmask, the mask applied as -inf."""

    def __init__(self, tok: Any, grammar: str):
        import llguidance
        import llguidance.torch as llt

        self._llt, self._matcher = llt, llguidance.LLMatcher(tok, grammar)
        self._mask = llt.allocate_token_bitmask(1, tok.vocab_size)
        self._bits = torch.arange(32, dtype=torch.int32)
        self._seen = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._seen and input_ids.shape[1] > self._seen:
            self._matcher.consume_token(int(input_ids[0, -1]))
        self._seen = input_ids.shape[1]
        self._llt.fill_next_token_bitmask(self._matcher, self._mask, 0)
        allowed = ((self._mask[0].unsqueeze(-1) >> self._bits) & 1).reshape(-1)[: scores.shape[-1]].bool()
        return scores.masked_fill(~allowed, float("-inf"))


def llguidance_engine(llm: LocalLLM, vocab: int) -> Callable[[dict], dict]:
    import llguidance
    import llguidance.hf

    tok = llguidance.hf.from_tokenizer(llm.tokenizer, n_vocab=vocab, eos_token=llm._eos_ids()[0])

    def make(schema: dict) -> dict:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        return {"logits_processor": [_LLGuidanceProcessor(tok, grammar)]}
    return make


def lmfe_engine(llm: LocalLLM, vocab: int) -> Callable[[dict], dict]:
    import sys

    import transformers.tokenization_utils_base

    # lm-format-enforcer 0.11.3 imports transformers 4's module name; transformers 5 moved the class
    sys.modules.setdefault("transformers.tokenization_utils", transformers.tokenization_utils_base)
    from lmformatenforcer import JsonSchemaParser
    from lmformatenforcer.integrations.transformers import (build_token_enforcer_tokenizer_data,
                                                            build_transformers_prefix_allowed_tokens_fn)

    data = build_token_enforcer_tokenizer_data(llm.tokenizer, vocab_size=vocab)
    return lambda schema: {"prefix_allowed_tokens_fn": build_transformers_prefix_allowed_tokens_fn(
        data, JsonSchemaParser(schema))}


def outlines_engine(llm: LocalLLM, vocab: int) -> Callable[[dict], dict]:
    import outlines
    from outlines.backends import get_json_schema_logits_processor

    model = outlines.from_transformers(llm.model, llm.tokenizer)
    return lambda schema: {"logits_processor": [get_json_schema_logits_processor(
        "outlines_core", model, json.dumps(schema), whitespace_pattern="")]}


ENGINES = {"xgrammar": xgrammar_engine, "llguidance": llguidance_engine, "lm-format-enforcer": lmfe_engine,
           "outlines": outlines_engine}
PACKAGES = {"xgrammar": "xgrammar", "llguidance": "llguidance", "lm-format-enforcer": "lm-format-enforcer",
            "outlines": "outlines"}


# ---------------------------------------------------------------- timing


class _Clock:
    """A streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def per_token(llm: LocalLLM, ids: list[int], max_new: int, extra: dict) -> tuple[list[int], float]:
    """(new ids, decode seconds per token after the first): the time between the first and last new token."""
    from transformers import LogitsProcessorList

    args = llm._generate_args(ids, {"max_new_tokens": max_new})
    if "logits_processor" in extra:
        extra = {**extra, "logits_processor": LogitsProcessorList(extra["logits_processor"])}
    clock = _Clock()
    with torch.inference_mode():
        out = llm.model.generate(**args, **extra, streamer=clock)
    steps = clock.times[1:]  # [0] is the prompt
    return out[0, len(ids):].tolist(), (steps[-1] - steps[0]) / max(1, len(steps) - 1)


def check(text: str, schema: dict) -> dict[str, Any]:
    """parses: the object is found in the text; validates: it matches; only_object: no text outside it."""
    got = json_checks(text, schema)
    return {"parses": got["json_parses"], "validates": got["json_valid"], "only_object": got["json_only"],
            "value": first_object(text)}


def engine_rows(llm: LocalLLM, engines: list[str], names: list[str], runs: int, max_new: int) -> list[dict]:
    vocab = llm.model.config.vocab_size
    rows = []
    free = {}
    schemas = {n: SCHEMAS[n] for n in names}
    for name, (question, schema) in tqdm(schemas.items(), desc="free", mininterval=10):
        ids = llm.encode_prompt(llm.chat_prompt(f"{question} {structured.instruction(schema)}"))
        free[name] = statistics.median(per_token(llm, ids, max_new, {})[1] for _ in range(runs))
    for engine in engines:
        t = time.perf_counter()
        make = ENGINES[engine](llm, vocab)
        setup = time.perf_counter() - t
        for name, (question, schema) in tqdm(schemas.items(), desc=engine, mininterval=10):
            ids = llm.encode_prompt(llm.chat_prompt(f"{question} {structured.instruction(schema)}"))
            t = time.perf_counter()
            make(schema)
            compile_s = time.perf_counter() - t  # lm-format-enforcer and llguidance compile lazily, while decoding
            timings, new = [], []
            for _ in range(runs):
                new, s = per_token(llm, ids, max_new, make(schema))
                timings.append(s)
            text = llm.tokenizer.decode(new, skip_special_tokens=True)
            rows.append({"engine": engine, "schema": name, "setup_s": round(setup, 3), "compile_s": round(compile_s, 4),
                         **check(text, schema), "tokens": len(new), "free_s_per_token": round(free[name], 5),
                         "s_per_token": [round(x, 5) for x in timings],
                         "median_s_per_token": round(statistics.median(timings), 5),
                         "ratio": round(statistics.median(timings) / free[name], 3), "text": text})
    return rows


# ---------------------------------------------------------------- long prompts: a passcode needle


def needle_prompt(llm: LocalLLM, length: int, depth: float, code: str) -> str:
    """SQLite documentation of ``length`` prompt tokens in all with the passcode sentence at ``depth``."""
    words = " ".join(p.read_text() for p in sorted(SQLITE.glob("*.txt"))).split()
    needle = f" The secret passcode is {code}. "
    question = ("What is the secret passcode in the text above? " + structured.instruction(PASSCODE))
    lo, hi = 0, len(words)
    while lo < hi:  # the most words that fit the length with the needle and the question
        mid = (lo + hi + 1) // 2
        if llm.count_tokens(llm.chat_prompt(" ".join(words[:mid]) + needle + question)) <= length:
            lo = mid
        else:
            hi = mid - 1
    cut = int(lo * depth)
    return llm.chat_prompt(" ".join(words[:cut]) + needle + " ".join(words[cut:lo]) + "\n\n" + question)


def needle_rows(llm: LocalLLM, lengths: list[int], depths: list[float], runs: int) -> list[dict]:
    vocab = llm.model.config.vocab_size
    make = xgrammar_engine(llm, vocab)
    rows = []
    rng = random.Random(0)
    for length in lengths:
        for depth in tqdm(depths, desc=f"needle {length}", mininterval=10):
            code = str(rng.randrange(10**6, 10**7))
            ids = llm.encode_prompt(needle_prompt(llm, length, depth, code))
            for mode in ("free", "constrained"):
                timings = []
                for _ in range(runs):
                    new, s = per_token(llm, ids, 24, make(PASSCODE) if mode == "constrained" else {})
                    timings.append(s)
                text = llm.tokenizer.decode(new, skip_special_tokens=True).strip()
                ok = check(text, PASSCODE)
                found = isinstance(ok["value"], dict) and ok["value"].get("passcode") == code
                rows.append({"length": length, "prompt_tokens": len(ids), "depth": depth, "mode": mode, **ok,
                             "found": found, "s_per_token": [round(x, 5) for x in timings],
                             "median_s_per_token": round(statistics.median(timings), 5), "text": text})
    return rows


def _block(frame: pd.DataFrame, index: bool = True) -> str:
    return "```\n" + frame.to_string(index=index) + "\n```"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--schemas", default=",".join(SCHEMAS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--depths", default="0.5")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS / "structured_engines")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LocalLLM("default", dtype="float32")
    engines = [e for e in args.engines.split(",") if e]
    rows = engine_rows(llm, engines, args.schemas.split(","), args.runs, args.max_new_tokens)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    needle = needle_rows(llm, lengths, [float(x) for x in args.depths.split(",")], args.runs) if lengths else []
    header = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor()
              or platform.machine(), "cpu_threads": args.threads, "model": "SmolLM2-135M-Instruct fp32 (embedded)",
              "runs": args.runs, "versions": {p: version(p) for p in ["torch", "transformers", *PACKAGES.values()]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**header, "engines": rows, "needle": needle}, indent=1))
    table = pd.DataFrame(rows).drop(columns=["value"])
    summary = table.groupby("engine").agg(valid=("validates", "sum"), only_object=("only_object", "sum"), schemas=("schema", "count"),
                                          setup_s=("setup_s", "first"), compile_s=("compile_s", "median"),
                                          ratio_median=("ratio", "median"), ratio_max=("ratio", "max"))
    md = [f"# Grammar engines on CPU ({header['date']})", "", f"`{json.dumps(header['versions'])}`, "
          f"{args.threads} thread(s), median of {args.runs} runs", "", _block(summary), "",
          _block(table.drop(columns=["s_per_token", "text"]), index=False)]
    if needle:
        n = pd.DataFrame(needle).drop(columns=["value"])
        md += ["", "## Passcode needle, xgrammar", "", _block(n.groupby(["length", "mode"]).agg(
            cells=("found", "count"), parses=("parses", "sum"), validates=("validates", "sum"),
            only_object=("only_object", "sum"), found=("found", "sum"),
            s_per_token=("median_s_per_token", "median"))), "",
            _block(n.drop(columns=["s_per_token"]), index=False)]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
