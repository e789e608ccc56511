"""Greedy decoding that shares a prompt prefix's KV cache across the cells of a group.

Cells of one length share the haystack up to their needle. The group's ``base`` is the needle-free prompt
(the control cell): each cell's prompt equals ``base`` up to its needle. Cells are visited in order of
that shared prefix; one DynamicCache holds ``base[:p]`` and grows only forward. A cell feeds its own tokens
after ``p``, decodes greedily, and the cache is cropped back to ``p`` — so the haystack prefix is computed
once for the whole group instead of once per cell. Answers equal ``model.generate`` greedy answers
(tests/test_needle_decode.py checks it on the real model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache


@dataclass
class Decoded:
    index: int  # position of the prompt in the group's input list
    new_ids: list[int]
    reused_tokens: int  # prompt tokens whose KV came from the shared cache
    computed_tokens: int  # prompt tokens fed to the model for this cell
    seconds: float


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class GreedyDecoder:
    """Greedy decoding on a Hugging Face causal LM with prefix-cache reuse within a group of prompts."""

    def __init__(self, model, eos_ids: Sequence[int], max_new_tokens: int):
        self.model, self.eos, self.max_new_tokens = model, set(eos_ids), max_new_tokens
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def _forward(self, ids: Sequence[int], cache: DynamicCache) -> torch.Tensor:
        x = torch.tensor([list(ids)], device=self.device)
        # logits of the last position only: the full-vocabulary head over every prompt token is wasted work
        return self.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]

    @torch.inference_mode()
    def run_group(self, prompts: Sequence[Sequence[int]], base: Sequence[int] | None = None) -> Iterator[Decoded]:
        """Decode every prompt; yields results as they finish (in shared-prefix order, not input order)."""
        shared = [min(common_prefix(p, base), len(p) - 1) if base is not None else 0 for p in prompts]
        cache = DynamicCache(config=self.model.config)
        cached = 0
        for i in sorted(range(len(prompts)), key=lambda j: shared[j]):
            t0 = time.perf_counter()
            p = shared[i]
            if p > cached:
                self._forward(base[cached:p], cache)
                cached = p
            elif p < cached:
                _crop_to(cache, p)
                cached = p
            logits = self._forward(prompts[i][p:], cache)
            new: list[int] = []
            for _ in range(self.max_new_tokens):
                tok = int(torch.argmax(logits))
                if tok in self.eos:
                    break
                new.append(tok)
                if len(new) == self.max_new_tokens:
                    break
                logits = self._forward([tok], cache)
            _crop_to(cache, cached)
            yield Decoded(i, new, p, len(prompts[i]) - p, time.perf_counter() - t0)


def _crop_to(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of the cache (transformers 5 crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
