"""Synthetic key-value retrieval (Liu et al. 2024, section 3): a JSON object of random UUID pairs; ask one key.

Each object is generated from (seed, item, number of pairs) alone, so a run and its resume see the same
object; the cells of one object differ only in which key is asked, so they share the whole JSON prefix.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass

INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."


@dataclass(frozen=True)
class KVObject:
    """Key/value pairs in prompt order."""

    pairs: tuple[tuple[str, str], ...]

    def key(self, position: int) -> str:
        return self.pairs[position][0]

    def value(self, position: int) -> str:
        return self.pairs[position][1]

    def json(self) -> str:
        """The object as the prompt shows it: one pair per line."""
        return json.dumps(dict(self.pairs), indent=1)


def make_kv(n_pairs: int, seed: int, item: int) -> KVObject:
    """``n_pairs`` distinct random UUID keys with random UUID values, deterministic in (n_pairs, seed, item)."""
    rng = random.Random(f"kv:{seed}:{item}:{n_pairs}")
    keys: dict[str, str] = {}
    while len(keys) < n_pairs:
        k = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if k not in keys:
            keys[k] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return KVObject(tuple(keys.items()))


def kv_user_text(obj: KVObject, position: int, answer_instruction: str = "") -> str:
    """The user message asking for the value of the key at ``position`` (``answer_instruction``: how to answer,
    e.g. as a JSON object, in place of the "Corresponding value:" cue)."""
    ask = answer_instruction or "Corresponding value:"
    return f"{INSTRUCTION}\n\nJSON data:\n{obj.json()}\n\nKey: \"{obj.key(position)}\"\n{ask}"
