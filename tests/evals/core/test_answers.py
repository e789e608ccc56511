"""--answer-format json / --constrained: settings, hashes that old runs keep, schemas, budgets and the score fields."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from evals.core import answers
from evals.core.errors import SettingsError
from evals.core.spec import config_hash
from evals.lost_in_middle.suite import SCHEMAS, LitmSettings, load_qa
from evals.lost_in_middle.suite import main as litm_main
from evals.lost_in_middle.passages import qa_scores
from evals.needle.needles import NEEDLE_TYPES, make_needle, needle_scores
from evals.needle.suite import NeedleSettings
from evals.needle.suite import main as needle_main


def _stored(run: dict) -> dict:
    """A committed run's settings as keyword arguments (what the suite hashed, less what it added)."""
    return {k: v for k, v in run["settings"].items() if k not in ("pool", "qa_fingerprint", "recipe_version")}


def test_runs_made_before_json_answers_keep_their_configuration_hash(repo_root):
    """The committed runs' config (which every cell id hashes) is what today's settings hash to."""
    run = json.loads((repo_root / "benchmarks/results/haystack_start_2k/fixed/run.json").read_text())
    s = NeedleSettings(**_stored(run))
    assert "answer_format" not in s.hashed() and "constrained" not in s.hashed()
    assert config_hash({**s.hashed(), "pool": run["settings"]["pool"]}) == run["config"]
    run = json.loads((repo_root / "benchmarks/results/litm_default_smollm2/run.json").read_text())
    s = LitmSettings(**_stored(run))
    extra = {"pool": run["settings"]["pool"], "qa_fingerprint": run["settings"]["qa_fingerprint"]}
    assert config_hash({**s.hashed(), **extra}) == run["config"]
    # explicit defaults hash like absent ones; JSON answers and the grammar are configuration
    assert NeedleSettings(lengths="1k", answer_format="text", constrained="no").hashed() == \
        NeedleSettings(lengths="1k").hashed()
    free = NeedleSettings(lengths="1k", answer_format="json").hashed()
    both = NeedleSettings(lengths="1k", answer_format="json", constrained="both").hashed()
    assert free["answer_format"] == "json" and "constrained" not in free and both["constrained"] == "both"


def test_constrained_without_json_answers_is_a_settings_error_exit_2(tmp_path, capsys):
    with pytest.raises(SettingsError, match="--constrained .* needs --answer-format json"):
        NeedleSettings(lengths="1k", constrained="yes")
    with pytest.raises(SettingsError, match="--constrained .* needs --answer-format json"):
        LitmSettings(constrained=True)  # a suite file's `constrained: true`
    assert needle_main(["--lengths", "1k", "--constrained", "--out", str(tmp_path / "run")]) == 2
    assert "needs --answer-format json" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert litm_main(["--constrained", "both", "--out", str(tmp_path / "litm")]) == 2
    assert "needs --answer-format json" in capsys.readouterr().err


def test_bad_answer_format_values_name_the_choices(tmp_path, capsys):
    with pytest.raises(SettingsError, match="--answer-format 'xml' is unknown; choose text or json"):
        NeedleSettings(lengths="1k", answer_format="xml")
    with pytest.raises(SettingsError, match="--constrained 'maybe' is unknown"):
        LitmSettings(answer_format="json", constrained="maybe")
    (tmp_path / "s.yaml").write_text("lengths: 1k\nanswer_format: json\nconstrained: true\n")
    from evals.needle.suite import settings_from_args

    s, _ = settings_from_args(["--config", str(tmp_path / "s.yaml")])
    assert (s.answer_format, s.constrained) == ("json", "yes")
    with pytest.raises(SystemExit):
        needle_main(["--lengths", "1k", "--answer-format", "yaml"])
    assert "invalid choice: 'yaml'" in capsys.readouterr().err


def test_generation_budget_holds_the_longest_valid_object():
    for kind in NEEDLE_TYPES:
        n = make_needle(kind, 3)
        s = NeedleSettings(lengths="1k", needle=kind, answer_format="json")
        assert s.max_new_tokens >= answers.longest_object(n.schema) >= len(json.dumps(n.reference))
    assert NeedleSettings(lengths="1k", needle="multivalue", answer_format="json").max_new_tokens == 141
    assert NeedleSettings(lengths="1k", answer_format="json").max_new_tokens == 32  # the text default holds 28
    assert LitmSettings(answer_format="json").max_new_tokens == 78  # {"answer": "<64 characters>"}
    with pytest.raises(SettingsError, match=r"--max-new-tokens 20 cannot hold .* \(28 tokens\); raise it to at least 28"):
        NeedleSettings(lengths="1k", answer_format="json", max_new_tokens=20)
    with pytest.raises(SettingsError, match="no length bound"):
        answers.longest_object({"type": "string", "pattern": "^[0-9]+$"})
    with pytest.raises(SettingsError, match="no maxItems"):
        answers.longest_object({"type": "array", "items": {"enum": ["a"]}})


@pytest.mark.parametrize("kind", NEEDLE_TYPES)
def test_each_needles_reference_object_validates_against_its_schema(kind):
    n = make_needle(kind, 7)
    assert Draft202012Validator(n.schema).is_valid(n.reference)
    assert not Draft202012Validator(n.schema).is_valid({**n.reference, "note": "x"})  # additionalProperties false
    assert answers.field_match(n.reference, n.reference) == (1.0, True)


def test_every_qa_question_has_an_answer_the_qa_schema_holds_and_strict_credits(repo_root):
    """The QA schema's strings are ASCII without quotes (one token per character); an alias with its quotes and
    curly apostrophes dropped is credited in JSON whenever the alias is credited as a text answer (SQuAD
    normalization drops them too), so the schema makes no question unanswerable."""
    schema = SCHEMAS["qa"]
    for item in load_qa(repo_root / "corpora/qa/qa.jsonl"):
        plain = ["".join(c for c in a if c.isascii() and c not in '"\\') for a in item.answers]
        fits = [a for a in plain if Draft202012Validator(schema).is_valid({"answer": a})]
        as_json = any(qa_scores(json.dumps({"answer": a}), item.answers, "qa", "answer")["found_strict"]
                      for a in fits)
        as_text = any(qa_scores(a, item.answers, "qa")["found_strict"] for a in item.answers)
        assert as_json == as_text, item.id


def _schema_values():
    """(schema, a value of it) for the suites' answer schemas, values drawn from their patterns."""
    schemas = [make_needle(k, s).schema for k in NEEDLE_TYPES for s in (1, 2)] + list(SCHEMAS.values())

    def value(schema):
        if schema.get("type") == "object":
            return st.fixed_dictionaries({k: value(v) for k, v in schema["properties"].items()})
        if schema.get("type") == "array":
            return st.lists(value(schema["items"]), min_size=schema.get("minItems", 0), max_size=schema["maxItems"])
        return st.from_regex(schema["pattern"], fullmatch=True)

    return st.sampled_from(schemas).flatmap(lambda s: st.tuples(st.just(s), value(s)))


@settings(max_examples=60, deadline=None)
@given(case=_schema_values())
def test_the_longest_object_bounds_every_valid_object_in_tokens(smollm2_tokenizer, case):
    """Property: any value of a suite schema, written as the grammar writes it, takes no more tokens (SmolLM2's
    tokenizer) than longest_object says -- so the generation budget holds it."""
    schema, value = case
    assert Draft202012Validator(schema).is_valid(value)
    text = json.dumps(value, separators=(", ", ": "))
    bound = answers.longest_object(schema)
    assert len(text) <= bound
    assert len(smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]) <= bound


def test_json_checks_tell_parses_valid_and_only_the_object_apart():
    schema = make_needle("passcode", 1).schema
    assert answers.json_checks('{"passcode": "57318"}', schema) == {"json_parses": True, "json_valid": True,
                                                                    "json_only": True}
    assert answers.json_checks('Sure: {"passcode": "57318"}', schema) == {"json_parses": True, "json_valid": True,
                                                                          "json_only": False}
    assert answers.json_checks('{"passcode": 57318}', schema) == {"json_parses": True, "json_valid": False,
                                                                  "json_only": True}
    assert answers.json_checks('```json\n{"passcode": "5', schema) == {"json_parses": False, "json_valid": False,
                                                                       "json_only": False}
    assert answers.json_checks("The secret passcode is 57318.", schema)["json_parses"] is False


def test_strict_json_scoring_reads_the_fields_lenient_reads_the_text():
    n = make_needle("passcode", 1)  # 57318
    got = needle_scores('{"passcode": "57318"}', [n], json_answer=True)
    assert got["found_strict"] and got["found_lenient"]
    got = needle_scores("The secret passcode is 57318.", [n], json_answer=True)
    assert not got["found_strict"] and got["found_lenient"]  # no object: nothing to read the field from
    got = needle_scores('{"passcode": "12345", "note": "not 57318"}', [n], json_answer=True)
    assert not got["found_strict"] and got["found_lenient"]
    assert needle_scores('{"passcode": 57318}', [n], json_answer=True)["found_strict"]  # the value, if not the type
    mv = make_needle("multivalue", 1)
    values = list(mv.expected)
    assert answers.field_match({"numbers": values[:2]}, mv.reference) == (0.5, False)
    assert answers.field_match({"numbers": values + ["1234567"]}, mv.reference) == (0.8, False)
    assert answers.field_match({"numbers": list(reversed(values))}, mv.reference) == (1.0, True)
    mq = make_needle("multiquery", 1)
    wrong = {**mq.reference, mq.asked[0]: "0000000"}
    assert answers.field_match(wrong, mq.reference)[1] is False
    assert answers.field_match([1, 2], mq.reference) == (0.0, False)


def test_qa_json_scoring_judges_the_answer_field():
    golds = ["100% branch test coverage", "100%"]
    assert qa_scores('{"answer": "100%"}', golds, "qa", "answer")["found_strict"]
    assert not qa_scores('{"answer": "maybe 100%"}', golds, "qa", "answer")["found_strict"]  # hedged
    assert not qa_scores('{"other": "100%"}', golds, "qa", "answer")["found_strict"]
    uuid = "56a07c85-f903-4c47-8d2a-7556121f4c4e"
    assert qa_scores(f'{{"value": "{uuid}"}}', [uuid], "kv", "value")["found_strict"]
    assert not qa_scores(f'The value is {uuid}', [uuid], "kv", "value")["found_strict"]
