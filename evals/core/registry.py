"""The suites, each registered once by its own package: what the shared code (comparison, regression jobs,
the run skeleton) needs to know of a suite, so that none of it names one.

A suite package's ``__init__`` calls :func:`register` with a :class:`SuiteRecord`: the suite's name (as
run.json and cell ids spell it), its command, how its rows are compared (:class:`Layout`, light: no model
code), and ``load``, which imports the suite's model-side code (torch) only when a run or a settings check
needs it and returns its :class:`SuiteCode` (settings class, execute, report, re-scoring of a row).
:func:`suites` imports every package of ``evals/`` once, so each registers itself before it is looked up.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from evals.core.settings import SuiteSettings
    from evals.core.store import RunDir


@dataclass(frozen=True)
class Layout:
    """How a suite's rows are compared: the coordinate fields of a cell, which rows count, their groups, and
    (when the settings determine it) the scored cells a finished run must hold."""

    coords: tuple[str, ...]
    scored: Callable[[dict], bool]
    groups: Callable[[dict], list[str]]
    expected: Callable[[dict], set[tuple]] | None = None  # run.json -> coordinates of every scored cell
    defaults: Callable[[dict], dict] | None = None  # run.json -> coordinates rows made by older code lack


@dataclass(frozen=True)
class SuiteCode:
    """A suite's model-side code: its settings, how a run is made and reported, how a stored row is re-scored."""

    settings: type[SuiteSettings]
    execute: Callable[..., Path]  # (settings, target=None) -> the run directory
    write_report: Callable[[RunDir], Any]
    rescore_row: Callable[[dict, str, dict], dict]  # (row, scorer, run.json) -> the row's new score fields


@dataclass(frozen=True)
class SuiteRecord:
    """One suite as its package registers it."""

    name: str  # as run.json, rows and cell ids spell it
    command: str  # how a user runs it: "python -m evals.<package>"
    layout: Layout
    load: Callable[[], SuiteCode]  # imports the model-side code on first use

    @cached_property
    def code(self) -> SuiteCode:
        return self.load()


_SUITES: dict[str, SuiteRecord] = {}
_DISCOVERED = False


def register(record: SuiteRecord) -> SuiteRecord:
    """Add a suite (once: a second suite of the same name is a programming error)."""
    if _SUITES.setdefault(record.name, record) is not record:
        raise ValueError(f"a suite named {record.name!r} is registered twice")
    return record


def suites() -> dict[str, SuiteRecord]:
    """Every suite by name, in registration order (the packages of evals/ are imported on the first call)."""
    global _DISCOVERED
    if not _DISCOVERED:
        import evals

        for info in pkgutil.iter_modules(evals.__path__):
            if info.ispkg:
                importlib.import_module(f"evals.{info.name}")
        _DISCOVERED = True
    return dict(_SUITES)


def get(name: str) -> SuiteRecord | None:
    """The suite called ``name``, or None."""
    return suites().get(name)
