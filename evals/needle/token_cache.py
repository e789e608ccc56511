"""Tokenized prompt texts kept on disk, so a run and its resume tokenize each distinct text once.

Fitting a haystack to an exact length tokenizes whole rendered prompts several times (the fill's exact counts,
the final prompt, the needle's and the haystack's token offsets); many of these texts recur: every cell of a
length renders the same template head, the group's control is built again as its ``base``, and a resumed or
repeated run builds every cell again (issue 14 measured 3.3 s of prompt building per 32k group on a GPU host).

:class:`CachedCodec` wraps a :class:`~evals.needle.haystack.Codec`: ``encode`` looks the text up by a SHA-256 of the
tokenizer's fingerprint (``evals.core.targets.tokenizer_fingerprint``) and the text, in memory and then in
``directory`` (one ``.npy`` of int32 ids per text, written atomically); everything else goes to the wrapped
codec. Memory holds the last ``MEMORY_TEXTS`` texts' ids as int32 arrays (a 256k-token prompt: 1 MiB).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from evals.needle.haystack import Codec

MEMORY_TEXTS = 64
TOKENS_DIR = "tokens"  # the cache's folder in a run directory


class CachedCodec:
    """``codec`` with ``encode`` cached in memory and under ``directory`` (None: memory only)."""

    def __init__(self, codec: Codec, directory: str | os.PathLike[str] | None, fingerprint: str):
        self.codec, self.fingerprint = codec, fingerprint
        self.directory = Path(directory) if directory is not None else None
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def render(self, user: str, answer_prefix: str = "") -> str:
        return self.codec.render(user, answer_prefix)

    def encode_piece(self, text: str) -> list[int]:
        return self.codec.encode_piece(text)

    def encode(self, text: str) -> list[int]:
        key = hashlib.sha256(f"{self.fingerprint}\0{text}".encode()).hexdigest()
        ids = self._memory.get(key)
        path = self.directory / f"{key}.npy" if self.directory is not None else None
        if ids is None and path is not None and path.exists():
            ids = np.load(path)
        if ids is None:
            self.misses += 1
            ids = np.asarray(self.codec.encode(text), dtype=np.int32)
            if path is not None:
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, ids)
                os.replace(tmp, path)
        else:
            self.hits += 1
        self._memory[key] = ids
        self._memory.move_to_end(key)
        while len(self._memory) > MEMORY_TEXTS:
            self._memory.popitem(last=False)
        return ids.tolist()
