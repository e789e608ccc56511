"""Recorded scorers: every row names the scorer and version behind its ``score``/``found``, and keeps the
other scorer's verdict beside it, so a run can be re-scored from its stored answers (``--rescore``) and
compared only with runs scored alike. Each suite computes both verdicts of its answers with the rules of
evals.core.scoring; :func:`record` picks the one that counts.

- ``strict`` (default): the answer commits to the expected value(s): a clause states each of them and is
  neither negated nor hedged, and no other value of the needle's kind is claimed (evals.scoring.strict_match).
- ``lenient``: every expected value occurs as whole words somewhere in the answer (the substring score that
  gkamradt's NIAH v2 and RULER report; SQuAD-normalized for lost-in-the-middle QA).

A version is bumped whenever a rule changes what a scorer credits. Rows written before scorers were recorded
were scored by ``lenient`` version 0 (ASCII-only normalization).
"""

from __future__ import annotations

from typing import Any

from evals.core.errors import SettingsError

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
