"""Answer formats of the suites: free text (the default), or one JSON object of a schema (``--answer-format json``)
decoded free or under the schema's grammar (``--constrained``; ``both`` puts the two side by side in one run).

A suite describes the answer it expects as a *reference object* (``{"passcode": "48213"}``) and a schema whose
strings are patterns of bounded length over ASCII characters (:func:`bounded_string`): one character is at most
one token then, so :func:`longest_object` — the characters of the longest valid object as the grammar writes it
(``{"a": "x", "b": ["y", "z"]}``) — bounds its tokens, and the generation budget is set to hold it
(:func:`json_budget`). Each JSON cell records whether a JSON object is in the answer (``json_parses``), whether it
validates against the schema (``json_valid``), whether the answer is that object and nothing else
(``json_only``); ``found`` scores the parsed object's fields (:func:`field_match`; the suites' scorers,
evals/needle/needles.py and evals/lost_in_middle/passages.py, call it for JSON rows).
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

from evals.core.errors import SettingsError
from evals.core.scoring import normalize

ANSWER_FORMATS = ("text", "json")
CONSTRAINED = ("no", "yes", "both")
FREE, GRAMMAR = "free", "constrained"  # the decoding coordinate of a JSON cell
ASCII_TEXT = r"[ !#-\[\]-~]"  # printable ASCII but the quote and backslash: no escapes, one token per character at most
UUID_STRING = {"type": "string",
               "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"}
_QUANTIFIED = re.compile(r"(\[(?:\\.|[^\]])+\]|\\.|[^\\\[{])(?:\{(\d+)(?:,(\d+))?\})?")


def decodings(answer_format: str, constrained: str) -> tuple[str | None, ...]:
    """The decodings a run's cells take: None for text answers (no coordinate, so text cells keep their ids)."""
    if answer_format == "text":
        return (None,)
    return {"no": (FREE,), "yes": (GRAMMAR,), "both": (FREE, GRAMMAR)}[constrained]


def check(answer_format: str, constrained: str) -> None:
    """SettingsError for an unknown answer format or grammar setting, or a grammar without JSON answers."""
    if answer_format not in ANSWER_FORMATS:
        raise SettingsError(f"--answer-format {answer_format!r} is unknown; choose {' or '.join(ANSWER_FORMATS)}")
    if constrained not in CONSTRAINED:
        raise SettingsError(f"--constrained {constrained!r} is unknown; give --constrained alone (decode under the "
                            "schema's grammar), --constrained both (free and constrained cells side by side) or no")
    if constrained != "no" and answer_format != "json":
        raise SettingsError("--constrained decodes the answer under a JSON schema's grammar and needs "
                            "--answer-format json; add it, or drop --constrained")


def bounded_string(chars: str, longest: int, shortest: int = 1) -> dict[str, Any]:
    """A string schema: ``shortest`` to ``longest`` characters of the ASCII class ``chars`` (e.g. ``[0-9]``)."""
    return {"type": "string", "pattern": f"^{chars}{{{shortest},{longest}}}$"}


def object_schema(properties: dict[str, Any]) -> dict[str, Any]:
    """An object schema with exactly these properties, all required, nothing else allowed."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def longest_object(schema: dict[str, Any]) -> int:
    """Characters of the longest value of ``schema`` written compactly (``", "`` and ``": "`` separators, as the
    grammar writes it); SettingsError for a part without a bound (a pattern with ``*``/``+``, an array without
    ``maxItems``)."""
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        inner = sum(len(json.dumps(k)) + 2 + longest_object(v) for k, v in props.items())
        return 2 + inner + 2 * max(0, len(props) - 1)
    if kind == "array":
        if "maxItems" not in schema:
            raise SettingsError(f"the answer schema's array {schema} has no maxItems: its longest answer is unbounded")
        n = schema["maxItems"]
        return 2 + n * longest_object(schema["items"]) + 2 * max(0, n - 1)
    if kind == "string" and "pattern" in schema:
        return 2 + _pattern_length(schema["pattern"])
    raise SettingsError(f"the answer schema part {schema} has no length bound; use a bounded_string pattern")


def _pattern_length(pattern: str) -> int:
    """The longest match of a pattern made of character classes / literals, each with an optional ``{n}`` or
    ``{m,n}`` (what :func:`bounded_string` and fixed shapes like a UUID's write)."""
    body = pattern.removeprefix("^").removesuffix("$")
    total, pos = 0, 0
    while pos < len(body):
        m = _QUANTIFIED.match(body, pos)
        if not m or body[m.end():m.end() + 1] in ("*", "+", "?"):
            raise SettingsError(f"the answer pattern {pattern!r} has no length bound at {body[pos:]!r}")
        total += int(m.group(3) or m.group(2) or 1)
        pos = m.end()
    return total


def json_budget(default: int, schemas: Iterable[dict[str, Any]], given: int | None) -> int:
    """The generation budget of a JSON run: the text default or the longest valid object, whichever is larger;
    a ``--max-new-tokens`` that cannot hold the longest object is a SettingsError."""
    need = max(longest_object(s) for s in schemas)
    if given is None:
        return max(default, need)
    if given < need:
        raise SettingsError(f"--max-new-tokens {given} cannot hold the longest valid answer object of "
                            f"--answer-format json ({need} tokens); raise it to at least {need}, or leave it out")
    return given


def first_object(text: str) -> Any:
    """The first JSON object in ``text`` (None if there is none): what a lenient reader would extract."""
    start = text.find("{")
    while start >= 0:
        try:
            return json.JSONDecoder().raw_decode(text, start)[0]
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def json_checks(answer: str, schema: dict[str, Any]) -> dict[str, bool]:
    """``json_parses``: a JSON object is in the answer; ``json_valid``: that object matches ``schema``;
    ``json_only``: the answer is one JSON object and nothing else (surrounding whitespace aside)."""
    from jsonschema import Draft202012Validator

    value = first_object(answer)
    try:
        only = isinstance(json.loads(answer), dict)
    except json.JSONDecodeError:
        only = False
    return {"json_parses": value is not None,
            "json_valid": value is not None and Draft202012Validator(schema).is_valid(value), "json_only": only}


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


def add_flags(add: Any) -> None:
    """``--answer-format`` and ``--constrained``, on an ``ArgumentParser.add_argument``."""
    add("--answer-format", choices=ANSWER_FORMATS, help="text: a sentence (default); json: the question asks for one "
        "JSON object of the suite's schema, and each cell records whether the answer parses, validates and is only "
        "the object, and scores the object's fields (docs/structured.md)")
    add("--constrained", nargs="?", const="yes", choices=CONSTRAINED, help="with --answer-format json: decode under "
        "the schema's grammar (ragkit.structured); 'both': free and constrained cells of the same prompts side by "
        "side in one run")
