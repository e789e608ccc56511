"""Settings -> cells. A cell is one measurement; its id hashes the suite, the settings and its coordinates.

Shared by every suite: parsing of lengths and lists, YAML suite files (the flag wins), and the
configuration hash that makes resume refuse results produced under other settings.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from evals.core.errors import SettingsError

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_length(text: str | int) -> int:
    """'1k' -> 1024, '32k' -> 32768, '1m' -> 1048576, '3000' -> 3000 (k = 1024, like context windows)."""
    if isinstance(text, int):
        value = text
    else:
        m = _LENGTH.match(str(text))
        if not m:
            raise SettingsError(f"length {text!r} is not a token count: use e.g. 1k, 32k, 128k or 3000")
        scale = {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
        value = int(round(float(m.group(1)) * scale))
    if value <= 0:
        raise SettingsError(f"length {text!r} must be positive")
    return value


def parse_lengths(text: str | list | tuple) -> tuple[int, ...]:
    """A comma list (or YAML list) of lengths, sorted and de-duplicated."""
    items = _items(text)
    if not items:
        raise SettingsError("--lengths is empty: give e.g. --lengths 1k,2k,4k")
    return tuple(sorted({parse_length(x) for x in items}))


def parse_depths(text: str | int | list | tuple) -> tuple[float, ...]:
    """'0,25,50,75,100' -> those percents; a single integer N -> N evenly spaced depths from 0 to 100.

    A single depth is written with a percent sign or a trailing comma: '50%' or '50,'.
    """
    if isinstance(text, int) or (isinstance(text, str) and text.strip().isdigit()):
        n = int(text)
        if n < 1:
            raise SettingsError(f"--depths {text!r}: the number of depths must be at least 1")
        return (50.0,) if n == 1 else tuple(round(100 * i / (n - 1), 4) for i in range(n))
    out = []
    for x in _items(text):
        try:
            d = float(str(x).rstrip("%"))
        except ValueError:
            raise SettingsError(f"depth {x!r} is not a percent: use e.g. --depths 0,25,50,75,100 or --depths 5") from None
        if not 0 <= d <= 100:
            raise SettingsError(f"depth {x!r} is outside 0..100 (percent of the haystack)")
        out.append(d)
    if not out:
        raise SettingsError("--depths is empty: give e.g. --depths 0,50,100 or --depths 5")
    return tuple(sorted(set(out)))


def parse_ints(text: str | int | list | tuple, what: str) -> tuple[int, ...]:
    """'1,2,3' -> (1, 2, 3)."""
    try:
        values = tuple(int(x) for x in _items(text))
    except ValueError:
        raise SettingsError(f"{what} {text!r} must be a comma list of integers, e.g. 1,2,3") from None
    if not values:
        raise SettingsError(f"{what} is empty")
    return values


def _items(text: Any) -> list:
    if isinstance(text, (list, tuple)):
        return [x for x in text if str(x).strip() != ""]
    if isinstance(text, int):
        return [text]
    return [x.strip() for x in str(text).split(",") if x.strip()]


def load_suite_file(path: str | Path) -> dict[str, Any]:
    """A YAML suite file as a flat dict of settings (keys use underscores or dashes)."""
    p = Path(path)
    if not p.is_file():
        raise SettingsError(f"suite file {str(p)!r} does not exist; see evals/suites/ for examples")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SettingsError(f"suite file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"suite file {str(p)!r} must be a mapping of setting: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge_settings(from_file: Mapping[str, Any], from_flags: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
    """File values overlaid by every flag the user actually gave (flags win); unknown keys are errors."""
    unknown = sorted(set(from_file) - known)
    if unknown:
        raise SettingsError(f"suite file has unknown settings {unknown}; known: {sorted(known)}")
    merged = dict(from_file)
    merged.update({k: v for k, v in from_flags.items() if v is not None})
    return merged


def config_hash(settings: Mapping[str, Any]) -> str:
    """A short, stable hash of the settings that change results (canonical JSON)."""
    blob = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    """One measurement of a suite: its coordinates (length, depth, seed, ...) under a configuration."""

    suite: str
    config: str  # config_hash of the run's settings
    coords: dict[str, Any] = field(default_factory=dict)

    @property
    def cell_id(self) -> str:
        blob = json.dumps([self.suite, self.config, self.coords], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def __hash__(self) -> int:
        return hash(self.cell_id)

    def __getitem__(self, key: str) -> Any:
        return self.coords[key]
