"""Recorded scorers: every row names the scorer and version behind its ``score``/``found``, and keeps the
other scorer's verdict beside it, so a run can be re-scored from its stored answers (``--rescore``) and
compared only with runs scored alike.

- ``strict`` (default): the answer commits to the expected value(s): a clause states each of them and is
  neither negated nor hedged, and no other value of the needle's kind is claimed (evals.scoring.strict_match).
- ``lenient``: every expected value occurs as whole words somewhere in the answer (the substring score that
  gkamradt's NIAH v2 and RULER report; SQuAD-normalized for lost-in-the-middle QA).

JSON answers (``--answer-format json``): strict reads the fields of the answer's first JSON object (no object,
not found); lenient is the same text rule as above.

A version is bumped whenever a rule changes what a scorer credits. Rows written before scorers were recorded
were scored by ``lenient`` version 0 (ASCII-only normalization).
"""

from __future__ import annotations

from typing import Any, Sequence

from evals.core.answers import first_object
from evals.core.errors import SettingsError
from evals.core.scoring import ANY, UUID, answer_match, normalize, normalize_squad, strict_match, value_fraction
from evals.needle.needles import Needle, value_kind

SCORERS: dict[str, int] = {"strict": 1, "lenient": 1}  # name -> version
DEFAULT = "strict"
LEGACY = ("lenient", 0)  # rows without a recorded scorer


def check(name: str) -> str:
    """``name`` if it is a known scorer; SettingsError naming the choices otherwise."""
    if name not in SCORERS:
        raise SettingsError(f"--scorer {name!r} is unknown; choose one of {', '.join(SCORERS)}")
    return name


def scorer_of(row: dict[str, Any]) -> str:
    """'name@version' of the scorer that scored a stored row."""
    name, version = (row["scorer"], row.get("scorer_version")) if "scorer" in row else LEGACY
    return f"{name}@{version}"


def record(scores: dict[str, Any], name: str) -> dict[str, Any]:
    """Both verdicts, with ``score``/``found`` and ``scorer``/``scorer_version`` taken from scorer ``name``."""
    return {**scores, "score": scores[f"score_{name}"], "found": scores[f"found_{name}"], "scorer": name,
            "scorer_version": SCORERS[name]}


def needle_scores(answer: str, needles: Sequence[Needle], json_answer: bool = False) -> dict[str, Any]:
    """Strict and lenient verdicts of a needle answer. Several needles: a control standing for several seeds'
    (identical) prompts, found when the answer produces the value of any of them; its score is the best.
    ``json_answer``: strict scores the fields of the answer's JSON object (:func:`field_match`); lenient is the
    same either way (the values anywhere in the answer's text)."""
    if json_answer:
        value = first_object(answer)
        strict = [field_match(value, n.reference) for n in needles]
    else:
        strict = [(m.score, m.found) for m in (strict_match(answer, n.expected, value_kind(n.type)) for n in needles)]
    lenient = [value_fraction(answer, n.expected) for n in needles]
    return {"score_strict": max(s for s, _ in strict), "found_strict": any(f for _, f in strict),
            "score_lenient": max(lenient), "found_lenient": any(f == 1.0 for f in lenient)}


def field_match(value: Any, reference: dict[str, Any]) -> tuple[float, bool]:
    """(score, found) of a parsed JSON answer against the reference object: every field holds its value
    (compared normalized: case, Unicode form); a list field all of its values and no other. Score = values
    matched / (values expected + other values given), as the strict text scorer counts; no object scores 0."""
    if not isinstance(value, dict):
        return 0.0, False
    hit = extra = total = 0
    for key, want in reference.items():
        got = value.get(key)
        wanted = {normalize(str(x)) for x in (want if isinstance(want, list) else [want])}
        given = {normalize(str(x)) for x in (got if isinstance(got, list) else [] if got is None else [got])}
        hit, extra, total = hit + len(wanted & given), extra + len(given - wanted), total + len(wanted)
    return hit / (total + extra), hit == total and extra == 0


def qa_scores(answer: str, golds: Sequence[str], task: str, json_field: str | None = None) -> dict[str, Any]:
    """Strict and lenient verdicts of a lost-in-the-middle answer: QA golds are aliases (one suffices, compared
    SQuAD-normalized); a key-value answer must commit to the asked UUID and claim no other one. ``json_field``:
    strict judges only that field of the answer's JSON object (a key-value one must equal the UUID); lenient
    reads the whole text either way."""
    lenient = answer_match(answer, golds)
    if json_field is not None:
        value = first_object(answer)
        field = value.get(json_field) if isinstance(value, dict) else None
        if task == "kv":
            found = field_match(value, {json_field: golds[0]})[1]
        else:
            found = isinstance(field, str) and any(strict_match(field, [g], ANY, normalize_squad).found for g in golds)
    elif task == "kv":
        found = strict_match(answer, golds, UUID).found
    else:
        found = any(strict_match(answer, [g], ANY, normalize_squad).found for g in golds)
    return {"score_strict": float(found), "found_strict": found, "score_lenient": float(lenient),
            "found_lenient": lenient}
