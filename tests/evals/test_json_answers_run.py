"""--answer-format json --constrained both end to end on the real embedded SmolLM2 (float32, CPU), both suites."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from jsonschema import Draft202012Validator

from evals.core.answers import GRAMMAR, object_schema
from evals.core.decode import GreedyDecoder
from evals.core.rescore import rescore
from evals.core.store import RunDir
from evals.core.targets import wrap
from evals.lost_in_middle.suite import LitmSettings, LitmSuite
from evals.lost_in_middle.suite import execute as litm_execute
from evals.lost_in_middle.passages import PassagePool, load_qa
from evals.needle.needles import make_needle
from evals.needle.suite import NeedleSettings, execute, rebuild_prompt, rescore_row
from ragkit.structured import instruction


@pytest.fixture(scope="module")
def target(smollm2):
    return wrap(smollm2)


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_needle_json_run_puts_free_and_constrained_side_by_side(target, tmp_path):
    s = NeedleSettings(lengths="512", depths="0,100", haystack=("corpora/sqlite",), answer_format="json",
                       constrained="both", out=str(tmp_path / "run"), progress=False)
    out = execute(s, target)
    rows = _rows(out)
    assert sorted((r["kind"], r["decoding"]) for r in rows) == sorted(
        [("needle", d) for d in ("free", "constrained") for _ in range(2)] + [("control", "free"), ("control", "constrained")])
    schema = make_needle("passcode", 1).schema
    for r in rows:
        assert r["answer_format"] == "json" and {"json_parses", "json_valid", "json_only", "found"} <= set(r)
        assert instruction(schema) in r["question"]
        if r["kind"] == "needle":  # the length budget counts the longer question
            assert r["actual_tokens"] == r["target_tokens"] == 512
        if r["decoding"] == GRAMMAR:  # the grammar guarantees the shape, whatever the model knows
            assert r["json_valid"] and r["json_only"] and Draft202012Validator(schema).is_valid(json.loads(r["answer"]))
    for depth in (0.0, 100.0):  # the same prompt, prefilled once: the second decoding reused all of it
        pair = [r for r in rows if r["kind"] == "needle" and r["depth"] == depth]
        assert len({r["prompt_tokens"] for r in pair}) == 1 and pair[0]["recipe"] == pair[1]["recipe"]
        assert max(r["reused_tokens"] for r in pair) == pair[0]["prompt_tokens"]
    assert all(r["found"] for r in rows if r["kind"] == "needle" and r["decoding"] == GRAMMAR)  # SmolLM2 at 512
    report = (out / "report.md").read_text()
    assert "## JSON answers: free vs constrained" in report and "constrained: parses / valid / only object / found" in report
    assert "decoding" in pd.read_csv(out / "summary.csv").columns
    cell = next(r for r in rows if r["decoding"] == GRAMMAR and r["kind"] == "needle")
    prompt = rebuild_prompt(str(out), cell["cell_id"])  # the recipe rebuilds the JSON prompt token-exactly
    assert prompt.rstrip().endswith("assistant") and "matches this JSON schema" in prompt
    before = {r["cell_id"]: (r["found"], r["json_valid"]) for r in rows}
    rescore(out, "lenient", rescore_row, tmp_path / "lenient")
    after = _rows(tmp_path / "lenient")
    assert {r["cell_id"]: r["json_valid"] for r in after} == {k: v[1] for k, v in before.items()}
    assert all(r["found"] == r["found_lenient"] for r in after)


def test_constrained_suite_decoding_equals_generate_under_the_grammar(target, smollm2):
    """decode.py's per-prompt grammar (batched or not, the same prompt twice) answers like generate() with it."""
    schemas = [make_needle("passcode", 1).schema,
               object_schema({"size": {"enum": ["small", "large"]}, "count": {"type": "integer", "minimum": 1,
                                                                               "maximum": 9}})]
    prompts = [target.codec.encode(target.codec.render(f"Give an example. {instruction(s)}")) for s in schemas]
    prompts.append(prompts[0])  # the same prompt again, free: prefilled once, answered both ways
    want = [[t for t in smollm2.generate_ids(p, max_new_tokens=24, json_schema=s) if t not in target.eos_ids]
            for p, s in zip(prompts, schemas)]
    want.append(target.generate_naive(prompts[0], 24))
    for batch_size in (1, 2):
        processors = [target.json_processor(s) for s in schemas] + [None]
        got = {d.index: d.new_ids for d in GreedyDecoder(target.model, target.eos_ids, 24, batch_size=batch_size)
               .run_group(prompts, None, processors)}
        assert [got[i] for i in range(3)] == want, batch_size
    for ids, s in zip(want, schemas):
        assert Draft202012Validator(s).is_valid(json.loads(target.decode(ids)))


def test_litm_json_run_and_its_length_check_count_the_instruction(target, tmp_path, repo_root):
    kw = dict(task="both", docs="2", positions="first", kv_pairs="3", distractors="random", orderings="none",
              questions=1, controls=False, progress=False)
    s = LitmSettings(**kw, answer_format="json", constrained="both", out=str(tmp_path / "litm"))
    out = litm_execute(s, target)
    rows = _rows(out)
    assert sorted((r["task"], r["decoding"]) for r in rows) == sorted(
        (t, d) for t in ("qa", "kv") for d in ("free", "constrained"))
    for r in rows:
        assert {"json_parses", "json_valid", "json_only"} <= set(r) and r["max_new_tokens"] == 78
        if r["decoding"] == GRAMMAR:
            assert r["json_valid"] and r["json_only"]
    assert "## JSON answers: free vs constrained" in (out / "report.md").read_text()
    items = load_qa(repo_root / "corpora/qa/qa.jsonl")
    pool = PassagePool.from_paths([repo_root / "corpora/sqlite", repo_root / "corpora/python"])
    text = LitmSuite(LitmSettings(**kw, max_new_tokens=78), target, items, pool, "x").check_lengths()
    structured = json.loads((out / "run.json").read_text())["longest_prompts"]
    assert all(structured[k] > text[k] for k in text)  # same budget: the JSON instruction makes prompts longer
    assert RunDir(out).read_run()["settings"]["constrained"] == "both"
