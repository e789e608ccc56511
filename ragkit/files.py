"""Small durable-file helpers shared by the index directory and the adapter/finetune code."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_path(path: Path, directory: bool = False) -> None:
    """fsync a file, or a directory (so that renames inside it are durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
