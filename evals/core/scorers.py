"""Recorded scorers: every row names the scorer and version behind its ``score``/``found``, and keeps the
other scorer's verdict beside it, so a run can be re-scored from its stored answers (``--rescore``) and
compared only with runs scored alike.

- ``strict`` (default): the answer commits to the expected value(s): a clause states each of them and is
  neither negated nor hedged, and no other value of the needle's kind is claimed (evals.scoring.strict_match).
- ``lenient``: every expected value occurs as whole words somewhere in the answer (the substring score that
  gkamradt's NIAH v2 and RULER report; SQuAD-normalized for lost-in-the-middle QA).

A version is bumped whenever a rule changes what a scorer credits. Rows written before scorers were recorded
were scored by ``lenient`` version 0 (ASCII-only normalization).
"""

from __future__ import annotations

from typing import Any, Sequence

from evals.core.errors import SettingsError
from evals.core.scoring import ANY, UUID, answer_match, normalize_squad, strict_match, value_fraction
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


def needle_scores(answer: str, needles: Sequence[Needle]) -> dict[str, Any]:
    """Strict and lenient verdicts of a needle answer. Several needles: a control standing for several seeds'
    (identical) prompts, found when the answer produces the value of any of them; its score is the best."""
    strict = [strict_match(answer, n.expected, value_kind(n.type)) for n in needles]
    lenient = [value_fraction(answer, n.expected) for n in needles]
    return {"score_strict": max(m.score for m in strict), "found_strict": any(m.found for m in strict),
            "score_lenient": max(lenient), "found_lenient": any(f == 1.0 for f in lenient)}


def qa_scores(answer: str, golds: Sequence[str], task: str) -> dict[str, Any]:
    """Strict and lenient verdicts of a lost-in-the-middle answer: QA golds are aliases (one suffices, compared
    SQuAD-normalized); a key-value answer must commit to the asked UUID and claim no other one."""
    lenient = answer_match(answer, golds)
    if task == "kv":
        found = strict_match(answer, golds, UUID).found
    else:
        found = any(strict_match(answer, [g], ANY, normalize_squad).found for g in golds)
    return {"score_strict": float(found), "found_strict": found, "score_lenient": float(lenient),
            "found_lenient": lenient}
