"""Errors of the evaluation suites. Messages name the input at fault and say what to do."""

from __future__ import annotations


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
