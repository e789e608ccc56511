"""Errors of the evaluation suites. Messages name the input at fault and say what to do."""

from __future__ import annotations

import sys
from typing import Callable

from ragkit.errors import RagkitError


class EvalError(Exception):
    """Base class of every error the suites raise on purpose (the CLI prints it and exits 2)."""


class SettingsError(EvalError):
    """A flag or suite-file setting is malformed or contradicts another."""


class RunDirError(EvalError):
    """A run directory cannot be used as asked (exists without --resume, other settings, damaged)."""


class TooLongError(EvalError):
    """A requested length does not fit the model's context window."""


class RebuildError(EvalError):
    """A stored prompt recipe no longer rebuilds the exact prompt (corpus, tokenizer or code changed)."""


def cli_exit(command: Callable[[], int | None]) -> int:
    """Run a suite's command: an error the user can fix (ours or ragkit's) is printed without a traceback
    and gives exit code 2; anything else is a bug and propagates."""
    try:
        return command() or 0
    except (EvalError, RagkitError) as e:  # ragkit errors carry their own advice
        print(f"error: {e}", file=sys.stderr)
        return 2
