"""The text files a suite reads (haystacks, corpora) from the paths its settings give."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from evals.core.errors import SettingsError


def text_files(paths: Sequence[str | Path], suffixes: Sequence[str], missing: str) -> list[Path]:
    """The files of ``paths`` in order: a folder's files ending in one of ``suffixes`` (any case), sorted,
    from all its subfolders; a file as given. A path that does not exist is a SettingsError whose message is
    ``missing`` with ``{path}`` filled in."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        elif p.is_file():
            files.append(p)
        else:
            raise SettingsError(missing.format(path=str(p)))
    return files
