"""The recorded scorers, table-driven for every needle type: strict (commits to the values) vs lenient
(values anywhere), Unicode-aware normalization, --rescore of committed runs, regress refusing mixed scorers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evals.core import compare, scorers
from evals.core.errors import SettingsError
from evals.lost_in_middle.passages import qa_scores
from evals.needle.needles import NEEDLE_TYPES, make_needle, needle_scores, value_kind
from evals.core.scoring import normalize, strict_match

REPO = Path(__file__).resolve().parents[3]
NF4 = REPO / "benchmarks/results/regress_smollm2_h200/nf4/needle"
FP32 = REPO / "benchmarks/results/regress_smollm2_h200/baseline-nightly/needle"

# an answer shape -> (strict found, lenient found); {v} = the expected value(s) joined, {o} = another value
# of the needle's kind, {v0} = the first expected value
SHAPES = [
    ("{v}", True, True),
    (" {v}.", True, True),
    ("The answer is {v}. Remember it.", True, True),
    ("**{v}**", True, True),
    ("The answer is {v}, not {o}.", True, True),
    ("No, it is {v}.", True, True),
    ("It is not {v}.", False, True),
    ("{v} isn't it.", False, True),
    ("Maybe {v}.", False, True),
    ("Perhaps {v}, perhaps {o}.", False, True),
    ("{v} or {o}", False, True),
    ("{o}. The answer is {v}.", False, True),
    ("{v}. The answer is {o}.", False, True),
    ("{o}, {v}", False, True),
    ("The answer is {o}.", False, False),
    ("I do not know.", False, False),
    ("", False, False),
]


def _other(kind: str, seed: int) -> str:
    """A value of the needle's kind that the needle of ``seed`` does not expect."""
    n = make_needle(kind, seed)
    return next(v for s in range(seed + 1, seed + 50) for v in make_needle(kind, s).expected
                if v not in n.expected and v not in n.distractors)


@pytest.mark.parametrize("kind", NEEDLE_TYPES)
@pytest.mark.parametrize("shape,strict,lenient", SHAPES)
def test_every_needle_type_and_answer_shape(kind, shape, strict, lenient):
    n = make_needle(kind, 7)
    answer = shape.format(v=" and ".join(n.expected), o=_other(kind, 7), v0=n.expected[0])
    got = needle_scores(answer, [n])
    assert (got["found_strict"], got["found_lenient"]) == (strict, lenient), answer


@pytest.mark.parametrize("kind", ["multivalue", "multiquery"])
def test_several_values_score_fractions(kind):
    n = make_needle(kind, 3)
    got = needle_scores(", ".join(n.expected[:3]), [n])
    assert got["score_lenient"] == got["score_strict"] == 0.75 and not got["found_strict"]
    got = needle_scores(", ".join(n.expected) + ", " + _other(kind, 3), [n])
    assert got["found_lenient"] and not got["found_strict"] and got["score_strict"] == 0.8


def test_multikey_distractor_value_fails_strict_only():
    n = make_needle("multikey", 2)
    got = needle_scores(f"{n.expected[0]}, {n.distractors[0]}", [n])
    assert got["found_lenient"] and not got["found_strict"]


@pytest.mark.parametrize("answer,value,found", [
    (" 94730.\n\nThe secret passcode is 10.\n\nThe secret passcode is 1.", "94730", False),  # a committed NF4 row
    (" 57318.\n\nThe secret passcode is 57318.\n\nThe secret passcode is 573", "57318", True),  # cut by the budget
    (" 98849. It is a cryptographic key. It is a 20-bit", "98849", True),  # '20-bit' is a size, not a passcode
    ("The passcode is 57,318.", "57318", True),
    ("57318 is not the passcode.", "57318", False),
])
def test_passcode_answers_seen_in_committed_runs(answer, value, found):
    assert strict_match(answer, [value], value_kind("passcode")).found is found


def test_strict_qa_gold_is_an_alias_and_none_is_not_a_negation():
    got = qa_scores("The entry is None during import, so it raises ModuleNotFoundError.",
                            ["ModuleNotFoundError"], "qa")
    assert got["found_strict"] and got["found_lenient"]
    got = qa_scores("It does not raise ModuleNotFoundError.", ["ModuleNotFoundError", "x"], "qa")
    assert got["found_lenient"] and not got["found_strict"]


@pytest.mark.parametrize("text,expected", [
    ("café", "café"), ("CAFÉ!", "café"), ("Straße", "strasse"), ("ＡＢＣ１２３", "abc123"), ("①", "1"),
    ("東京タワー。", "東京タワー"), ("हिन्दी", "हिन्दी"), ("Ελληνικά;", "ελληνικά"), ("7,342 items", "7342 items"),
    ("lucky-ember", "lucky-ember"), ("a - b", "a b"), ("x_y", "x y"),
])
def test_normalize_keeps_letters_and_digits_of_every_script(text, expected):
    assert normalize(text) == expected


def test_unicode_values_match_whole_words():
    assert needle_scores("Die Antwort ist café.", [make_needle("passcode", 1)])["found_lenient"] is False
    assert strict_match("Die Antwort ist Café.", ["café"]).found
    assert not strict_match("cafés", ["café"]).found


def test_unknown_scorer_names_the_choices():
    with pytest.raises(SettingsError, match="strict, lenient"):
        scorers.check("exact")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_rescore_committed_nf4_run_without_generating(tmp_path):
    src = tmp_path / "nf4"
    shutil.copytree(NF4, src)
    before = (src / "results.jsonl").read_bytes()
    p = _run("evals.needle", "--rescore", str(src), "--out", str(tmp_path / "strict"))
    assert p.returncode == 0, p.stderr
    assert (src / "results.jsonl").read_bytes() == before  # --out: the source run is untouched
    rows = [json.loads(x) for x in (tmp_path / "strict/results.jsonl").read_text().splitlines()]
    old = [json.loads(x) for x in before.decode().splitlines()]
    assert [r["answer"] for r in rows] == [r["answer"] for r in old]
    assert {(r["scorer"], r["scorer_version"]) for r in rows} == {("strict", 1)}
    needles = [r for r in rows if r["kind"] == "needle"]
    assert sum(r["found_lenient"] for r in needles) == sum(r["found_lenient"] for r in old if r["kind"] == "needle")
    assert sum(r["found_lenient"] and not r["found_strict"] for r in needles) == 5
    text = (tmp_path / "strict/report.md").read_text()
    assert "**5 cells differ**" in text and "`strict@1`" in text
    meta = json.loads((tmp_path / "strict/run.json").read_text())
    assert meta["rescored"][0]["previous"] == ["lenient@0"]  # the committed run was re-scored from the old rows
    p = _run("evals.needle", "--rescore", str(tmp_path / "strict"), "--scorer", "lenient")  # in place
    assert p.returncode == 0, p.stderr
    again = [json.loads(x) for x in (tmp_path / "strict/results.jsonl").read_text().splitlines()]
    assert [r["found"] for r in again] == [r["found_lenient"] for r in old]
    assert json.loads((tmp_path / "strict/run.json").read_text())["rescored"][-1]["previous"] == ["strict@1"]


def test_rescore_refuses_an_occupied_out_and_a_missing_run(tmp_path):
    p = _run("evals.needle", "--rescore", str(NF4), "--out", str(FP32))
    assert p.returncode == 2 and "already holds a run" in p.stderr
    p = _run("evals.needle", "--rescore", str(tmp_path / "nothing"))
    assert p.returncode == 2 and "not a run directory" in p.stderr


def test_regress_refuses_runs_scored_differently(tmp_path):
    assert _run("evals.needle", "--rescore", str(NF4), "--scorer", "lenient", "--out", str(tmp_path / "lenient")
                ).returncode == 0
    result = compare.compare("needle", FP32, tmp_path / "lenient")
    assert result.invalid and "scored differently" in result.invalid and "--rescore" in result.invalid
    assert "strict@1" in result.invalid and "lenient@1" in result.invalid
    assert compare.compare("needle", FP32, NF4).invalid is None  # both committed runs: strict@1


def test_report_lists_first_misses_and_misses_csv_has_all(tmp_path):
    import pandas as pd

    out = tmp_path / "nf4-10"
    p = _run("evals.needle", "--rescore", str(REPO / "benchmarks/results/regress_smollm2_h200/nf4-10/niah10"),
             "--out", str(out))
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    missed = [r for r in rows if r["kind"] == "needle" and not r["found"]]
    assert len(missed) > 30
    assert f"First 30 of {len(missed)} misses" in (out / "report.md").read_text()
    assert sorted(pd.read_csv(out / "misses.csv")["cell_id"]) == sorted(r["cell_id"] for r in missed)
    meta = json.loads((out / "run.json").read_text())
    assert meta["git"]["commit"] is None and meta["git"]["dirty"] is None  # was a false "dirty: false"
