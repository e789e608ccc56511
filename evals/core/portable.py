"""Paths and commands as a run directory may carry them to another machine: no machine paths.

A path below the run directory is written relative to it, one below the current directory (or the
repository, where the default corpora live) relative to that; any other absolute path is reduced to its
file name, which with the fingerprints a run records (haystack pool, QA file, tokenizer) identifies it
without saying whose home directory it came from; a store URL (``postgresql://...``) keeps everything but
its password. The command is written as the user would retype it: ``python -m evals.needle --lengths 2k ...``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from ragkit.store.url import is_store_url, redact_url

REPO = Path(__file__).resolve().parents[2]


def portable_path(path: str | Path, run_dir: str | Path | None = None) -> str:
    """``path`` relative to ``run_dir``, the cwd or the repository when below one of them, else its name."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    for base in (run_dir, Path.cwd(), REPO):
        if base is None:
            continue
        for root, target in ((Path(base).absolute(), p), (Path(base).resolve(), p.resolve())):
            if target.is_relative_to(root):
                return str(target.relative_to(root))
    return p.name


def portable_value(value: Any, run_dir: str | Path | None = None) -> Any:
    """``value`` with every absolute path in it (strings, lists, dicts) made portable."""
    if isinstance(value, str):
        if is_store_url(value):
            return redact_url(value)
        return portable_path(value, run_dir) if value.startswith("/") else value
    if isinstance(value, (list, tuple)):
        return [portable_value(v, run_dir) for v in value]
    if isinstance(value, dict):
        return {k: portable_value(v, run_dir) for k, v in value.items()}
    return value


def _argument(arg: str) -> str:
    if "://" in arg:
        return redact_url(arg)
    flag, eq, value = arg.partition("=")
    if eq and flag.startswith("--") and value.startswith("/"):
        return f"{flag}={portable_path(value)}"
    return portable_path(arg) if arg.startswith("/") else arg


def command(argv: Sequence[str] | None = None) -> str:
    """The command line of this process as a user would retype it from the repository root or the cwd:
    ``python -m <module> <args>``, absolute paths in the arguments made portable."""
    argv = list(sys.argv if argv is None else argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if not argv:
        program = ["python"]
    elif spec is not None and spec.origin and Path(spec.origin).resolve() == Path(argv[0]).resolve():
        program = ["python", "-m", spec.name.removesuffix(".__main__")]  # it was run with -m
    else:
        program = ["python", portable_path(argv[0])]
    return shlex.join([*program, *(_argument(a) for a in argv[1:])])
