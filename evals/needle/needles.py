"""Needle generators: seeded, deterministic facts to hide in a haystack and the question that asks for them.

Types (``--needle``):
- ``passcode``: the classic single fact, a 5-digit passcode (the default).
- ``kv-words`` / ``kv-numbers`` / ``kv-uuid``: RULER-style key -> value, the value a word, a 7-digit number or a UUID.
- ``multikey``: one key -> value needle plus three distractor needles with other keys (RULER MK-NIAH).
- ``multivalue``: four values for one key, all asked for (RULER MV-NIAH).
- ``multiquery``: four keys, all asked for at once (RULER MQ-NIAH).
- ``nonliteral``: the question shares no content word with the needle (after NoLiMa): the needle names a
  landmark, the question names its city.

The first sentence of ``Needle.sentences`` is the primary needle (placed at the requested depth); the others
are placed at depths drawn from the same seed, so every cell of one seed sees them at the same places.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from evals.core.answers import UUID_STRING, bounded_string, field_match, first_object, object_schema
from evals.core.errors import SettingsError
from evals.core.scoring import NUMBER, UUID, ValueKind, strict_match, value_fraction

_ADJECTIVES = (
    "amber brave calm dusty eager fancy gentle hollow icy jolly kind lucky misty noble olive proud quiet rapid "
    "silver tidy urban vivid witty young zesty bold crisp distant elegant fragile golden humble ivory jagged "
    "lively mellow narrow orange polite rustic scarlet tender upbeat velvet wooden"
).split()
_NOUNS = (
    "anchor badger candle dolphin engine falcon garden harbor island jacket kettle lantern meadow needle orchard "
    "pepper quarry river saddle tunnel umbrella valley walnut yarrow zebra beacon cactus dragon ember fountain "
    "glacier hammer iceberg jasmine kayak lobster magnet nectar otter pebble quill rocket spider trumpet violin "
    "whistle"
).split()
# values of kv-words needles: rare words that a documentation haystack does not contain by chance.
_VALUE_WORDS = (
    "marmalade quixotic zeppelin flamingo porcupine kaleidoscope saxophone tambourine wombat gargoyle "
    "pomegranate xylophone narwhal origami chameleon mandolin"
).split()
_NAMES = "Yuki Stuart Katie Diego Mandla Veronica Ivan Priya Omar Lena Tariq Ingrid Mateo Aiko Femi Sven".split()
# landmark -> the city it is in; the question names only the city (no shared content word).
_LANDMARKS = (
    ("the Semper Opera House", "Dresden"),
    ("the Kiasma museum", "Helsinki"),
    ("the Atomium", "Brussels"),
    ("the Hallgrimskirkja church", "Reykjavik"),
    ("the Charles Bridge", "Prague"),
    ("the Alhambra palace", "Granada"),
    ("the Petronas Towers", "Kuala Lumpur"),
    ("the Christ the Redeemer statue", "Rio de Janeiro"),
)

NEEDLE_TYPES = (
    "passcode", "kv-words", "kv-numbers", "kv-uuid", "multikey", "multivalue", "multiquery", "nonliteral",
)


@dataclass(frozen=True)
class Needle:
    """What one cell hides and asks: sentences to insert, the question, the values the answer must contain."""

    type: str
    seed: int
    sentences: tuple[str, ...]
    question: str
    answer_prefix: str
    expected: tuple[str, ...]
    distractors: tuple[str, ...] = ()  # values of distractor needles (multikey): reported when answered
    extra_depths: tuple[float, ...] = ()  # depths (percent) of sentences[1:]
    asked: tuple[str, ...] = ()  # multiquery: the keys asked for, in order

    @property
    def reference(self) -> dict[str, Any]:
        """The right answer as a JSON object (``--answer-format json``): one field per asked value (the
        asked keys for multiquery), a list of all values for multivalue."""
        if self.type == "multiquery":
            return dict(zip(self.asked, self.expected))
        if self.type == "multivalue":
            return {"numbers": list(self.expected)}
        field = {"passcode": "passcode", "nonliteral": "name", "kv-words": "word", "kv-uuid": "uuid"}
        return {field.get(self.type, "number"): self.expected[0]}

    @property
    def schema(self) -> dict[str, Any]:
        """The JSON schema of the answer object: the reference's fields, each a bounded string of the value's
        kind (``multivalue``: a list of 1 to 8 of them), nothing else."""
        value = _VALUE_SCHEMAS[self.type]
        return object_schema({k: {"type": "array", "items": value, "minItems": 1, "maxItems": 8}
                              if isinstance(v, list) else value for k, v in self.reference.items()})

    @property
    def instruction(self) -> str:
        return ("Some important facts are hidden in the following text. Read it carefully; "
                "a question about them follows.")


def make_needle(kind: str, seed: int) -> Needle:
    """The needle of type ``kind`` for ``seed`` (same inputs, same needle, on every machine)."""
    if kind not in NEEDLE_TYPES:
        raise SettingsError(f"needle type {kind!r} is unknown; choose one of {', '.join(NEEDLE_TYPES)}")
    rng = random.Random(f"needle:{kind}:{seed}")
    if kind == "passcode":
        code = str(rng.randint(10000, 99999))
        return Needle(kind, seed, (f"The secret passcode is {code}. Remember it.",),
                      "What is the secret passcode?", "The secret passcode is", (code,))
    if kind == "nonliteral":
        name = rng.choice(_NAMES)
        landmark, city = rng.choice(_LANDMARKS)
        return Needle(kind, seed, (f"Actually, {name} lives next to {landmark}.",),
                      f"Which character has been to {city}? Answer with a name.", "The character is", (name,))
    value_kind = {"kv-words": "words", "kv-uuid": "uuid"}.get(kind, "numbers")
    keys = _distinct(rng, lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}", 4)
    thing = {"words": "word", "numbers": "number", "uuid": "uuid"}[value_kind]
    values = _distinct(rng, lambda: _value(rng, value_kind), 4)

    def fact(key: str, value: str) -> str:
        return f"One of the special magic {thing}s for {key} is: {value}."

    if kind in ("kv-words", "kv-numbers", "kv-uuid"):
        return Needle(kind, seed, (fact(keys[0], values[0]),),
                      f"What is the special magic {thing} for {keys[0]} mentioned in the text?",
                      f"The special magic {thing} for {keys[0]} is", (values[0],))
    extra = tuple(round(rng.uniform(0, 100), 2) for _ in range(3))
    if kind == "multikey":
        return Needle(kind, seed, tuple(fact(k, v) for k, v in zip(keys, values)),
                      f"What is the special magic {thing} for {keys[0]} mentioned in the text?",
                      f"The special magic {thing} for {keys[0]} is", (values[0],), tuple(values[1:]), extra)
    if kind == "multivalue":
        return Needle(kind, seed, tuple(fact(keys[0], v) for v in values),
                      f"What are all the special magic {thing}s for {keys[0]} mentioned in the text?",
                      f"The special magic {thing}s for {keys[0]} are", tuple(values), (), extra)
    # multiquery
    asked = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    return Needle(kind, seed, tuple(fact(k, v) for k, v in zip(keys, values)),
                  f"What are the special magic {thing}s for {asked} mentioned in the text?",
                  f"The special magic {thing}s for {asked} are", tuple(values), (), extra, tuple(keys))


_DIGITS = bounded_string("[0-9]", 12)
_WORD = bounded_string("[A-Za-z]", 24)
_VALUE_SCHEMAS: dict[str, dict[str, Any]] = {
    "passcode": _DIGITS, "kv-numbers": _DIGITS, "multikey": _DIGITS, "multivalue": _DIGITS, "multiquery": _DIGITS,
    "kv-words": _WORD, "nonliteral": _WORD,
    "kv-uuid": UUID_STRING,
}


def _value(rng: random.Random, kind: str) -> str:
    if kind == "words":
        return rng.choice(_VALUE_WORDS)
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randint(1_000_000, 9_999_999))


def _distinct(rng: random.Random, draw, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = draw()
        if v not in out:
            out.append(v)
    return out


def value_kind(kind: str) -> ValueKind:
    """What else an answer could claim in place of a needle of type ``kind``'s value (the strict scorer
    counts such claims against the answer): numbers, UUIDs, the value words or the character names."""
    if kind == "kv-words":
        return ValueKind("word", vocabulary=frozenset(_VALUE_WORDS))
    if kind == "kv-uuid":
        return UUID
    if kind == "nonliteral":
        return ValueKind("name", vocabulary=frozenset(n.casefold() for n in _NAMES))
    return NUMBER


def needle_scores(answer: str, needles: Sequence[Needle], json_answer: bool = False) -> dict[str, Any]:
    """Strict and lenient verdicts of a needle answer. Several needles: a control standing for several seeds'
    (identical) prompts, found when the answer produces the value of any of them; its score is the best.
    ``json_answer``: strict scores the fields of the answer's JSON object (evals.core.answers.field_match);
    lenient is the same either way (the values anywhere in the answer's text)."""
    if json_answer:
        value = first_object(answer)
        strict = [field_match(value, n.reference) for n in needles]
    else:
        strict = [(m.score, m.found) for m in (strict_match(answer, n.expected, value_kind(n.type)) for n in needles)]
    lenient = [value_fraction(answer, n.expected) for n in needles]
    return {"score_strict": max(s for s, _ in strict), "found_strict": any(f for _, f in strict),
            "score_lenient": max(lenient), "found_lenient": any(f == 1.0 for f in lenient)}
