"""Greedy decode steps on a static KV cache, replayed as one CUDA graph per batch (LocalLLM, the needle runner).

A decode step of a 7B model on an H200 is ~3.4 ms of weight reads, but run from Python step by step it took
37-100 ms: hundreds of small kernel launches, a cache that grows by concatenation and a mask rebuilt each step.
Here the prompt's KV, computed by an ordinary prefill, is copied once into buffers with room for the answer (a
transformers ``StaticCache`` adopts them), and one step only touches tensors at fixed addresses: mark the next
cache slot valid in a boolean ``[rows, 1, 1, slots]`` mask, feed each row's last token at its own position, take
the greedy token. So the step is captured once as a CUDA graph (first step eager, under
``torch.cuda.set_sync_debug_mode("error")``: a step that needs the host, e.g. an NF4 MoE routing its tokens,
stays eager on the static cache) and replayed per token. The host reads each step's tokens one step behind the
GPU (pinned copy + event), so the GPU never waits for the end-of-answer check.

Rows are left-padded to one width (their prompts end at the same slot), as ``generate()`` pads a batch; a row
that ends keeps its place in the graph (its later tokens are dropped), so the batch's shapes never change.
On a CPU nothing here is used by ragkit (its decode is host-bound either way); the same steps run eagerly there
so the tests can compare them with ``generate()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

from ragkit.attention import DECODE_CHUNK

# generation-config fields that change greedy decoding, with the values at which they do nothing
_NEUTRAL = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "min_new_tokens": (None, 0),
            "min_length": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
            "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
            "sequence_bias": (None,), "encoder_repetition_penalty": (None, 1.0)}


def plain_greedy(generation_config: Any) -> bool:
    """True if ``generate()`` with this config is plain argmax decoding (no sampling, penalties or forced tokens)."""
    if getattr(generation_config, "do_sample", False):
        return False
    return all(getattr(generation_config, k, None) in ok for k, ok in _NEUTRAL.items())


def supported(model: Any) -> bool:
    """True for a model on one CUDA device whose cache layers are plain full-attention layers."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return False
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


class StaticDecode:
    """Greedy steps over ``B`` rows whose prompts' KV sit right-aligned before slot ``width`` of the buffers.

    ``keys``/``values``: one ``[B, heads, slots, dim]`` tensor per layer (the model's own cache layout, latents
    for MLA); row ``b``'s prompt fills slots ``width - lengths[b] .. width - 1``, slots from ``width`` on are the
    answer's. ``first``: each row's first answer token (from the prefill's logits), fed by the first step.
    """

    def __init__(self, model: Any, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                 lengths: Sequence[int], width: int, first: Sequence[int], graph: bool | None = None):
        self.model = model
        device, slots = keys[0].device, keys[0].shape[2]
        self.room = slots - width
        self.cache = StaticCache(config=model.config, max_cache_len=slots)
        if len(self.cache.layers) != len(keys) or not all(type(la) is StaticLayer for la in self.cache.layers):
            raise ValueError("StaticDecode needs one full-attention cache layer per KV buffer")
        for layer, k, v in zip(self.cache.layers, keys, values):
            _adopt(layer, k, v, width)
        self.mask = torch.zeros(len(lengths), 1, 1, slots, dtype=torch.bool, device=device)
        self.pos = torch.zeros(len(lengths), 1, dtype=torch.long, device=device)
        self.tok = torch.zeros_like(self.pos)
        self.refill(lengths, width, first)
        self.use_graph = device.type == "cuda" if graph is None else graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps_run = 0

    @property
    def slots(self) -> int:
        return self.mask.shape[-1]

    def refill(self, lengths: Sequence[int], width: int, first: Sequence[int]) -> None:
        """Start over on new prompts whose KV the caller has written into the same buffers (same rows and slots),
        in place: a captured graph replays on them as it is."""
        device = self.mask.device
        lengths_t = torch.tensor(list(lengths), device=device)
        col = torch.arange(self.slots, device=device)
        self.mask.copy_(((col >= width - lengths_t[:, None]) & (col < width))[:, None, None, :])
        self.pos.copy_(lengths_t[:, None])
        self.tok.copy_(torch.tensor(list(first), device=device)[:, None])
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(width)
        self.room = self.slots - width

    @property
    def captured(self) -> bool:
        """True once the steps replay a CUDA graph (False: eager steps)."""
        return self.graph is not None

    def _step(self) -> None:
        slot = self.cache.layers[0].cumulative_length.view(1)  # where this step's token is written
        self.mask.index_fill_(3, slot, True)
        logits = self.model(input_ids=self.tok, attention_mask=self.mask, position_ids=self.pos, cache=self.cache,
                            use_cache=True, logits_to_keep=1).logits
        self.tok.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.pos.add_(1)

    def _run(self) -> None:
        """One step: the graph's replay, or (the first time on CUDA) an eager step checked for host syncs, then
        the capture of the next ones."""
        if self.graph is not None:
            self.graph.replay()
        elif not self.use_graph:
            self._step()
        else:
            self.use_graph = False
            state = [la.cumulative_length.clone() for la in self.cache.layers], self.pos.clone(), self.tok.clone()
            try:
                torch.cuda.set_sync_debug_mode("error")
                self._step()
                capturable = True
            except RuntimeError:  # the step needs the host: undo what ran of it and go on eagerly
                capturable = False
            finally:
                torch.cuda.set_sync_debug_mode(0)
            if not capturable:
                for la, n in zip(self.cache.layers, state[0]):
                    la.cumulative_length.copy_(n)
                self.pos.copy_(state[1])
                self.tok.copy_(state[2])
                self._step()
                return
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self._step()  # recorded, not run
            except RuntimeError:
                return
            self.graph = graph

    @torch.inference_mode()
    def steps(self, n: int) -> Iterator[list[int]]:
        """Run up to ``n`` steps (no more than the buffers' room); yields each step's tokens, one per row. The
        consumer may stop early (the answers have ended): at most one step past that point has run."""
        n = min(n, self.room)
        if self.tok.device.type != "cuda":
            for _ in range(n):
                self._run()
                self.steps_run += 1
                yield self.tok[:, 0].tolist()
            return
        host = torch.empty((max(n, 1), self.tok.shape[0]), dtype=self.tok.dtype, pin_memory=True)
        done: list[torch.cuda.Event] = []
        for s in range(n + 1):
            if s < n:
                self._run()
                self.steps_run += 1
                host[s].copy_(self.tok[:, 0], non_blocking=True)
                done.append(torch.cuda.Event())
                done[s].record()
            if s:
                done[s - 1].synchronize()
                yield host[s - 1].tolist()


def _adopt(layer: StaticLayer, keys: torch.Tensor, values: torch.Tensor, used: int) -> None:
    """Make a static cache layer use ``keys``/``values`` as its buffers, the first ``used`` slots filled."""
    layer.device = keys.device
    layer.batch_size, layer.num_heads = keys.shape[:2]
    layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
    layer.keys, layer.values = keys, values
    layer.cumulative_length = torch.tensor(used, device=keys.device)
    layer.is_initialized = True


def static_slots(n: int) -> int:
    """Slots of a static cache for ``n`` positions: whole chunks of :data:`ragkit.attention.DECODE_CHUNK` (the
    decode attention splits its reduction over them)."""
    return -(-n // DECODE_CHUNK) * DECODE_CHUNK


def buffers_like(cache: DynamicCache, rows: int, slots: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed ``[rows, heads, slots, dim]`` key and value buffers shaped like each layer of ``cache``."""
    keys = [la.keys.new_zeros(rows, la.keys.shape[1], slots, la.keys.shape[3]) for la in cache.layers]
    values = [la.values.new_zeros(rows, la.values.shape[1], slots, la.values.shape[3]) for la in cache.layers]
    return keys, values


BUCKET = 256  # smallest static cache greedy() keeps (slots: powers of two from here)


@torch.inference_mode()
def greedy(model: Any, input_ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int],
           graph: bool | None = None) -> list[int]:
    """The new ids of greedy ``generate()`` at batch 1 (an EOS it produces included, as ``generate`` returns
    it): a prefill on a DynamicCache, then :class:`StaticDecode` steps. The static cache (prompt + budget rounded
    up to a power of two, at least :data:`BUCKET` slots) and its captured graph stay on the model for the next
    call of the same bucket, so only the first call of a bucket pays the capture (~0.1 s for a 7B model)."""
    eos = set(eos_ids)
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    x = torch.tensor([list(input_ids)], device=device)
    first = int(model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1].argmax())
    new = [first]
    if first in eos or max_new_tokens <= 1:
        return new[:max_new_tokens]
    n = len(input_ids)
    slots = max(BUCKET, 1 << (n + max_new_tokens - 1).bit_length())  # calls of one bucket share a graph
    dec: StaticDecode | None = getattr(model, "_ragkit_decode", None)
    if dec is not None and dec.slots == slots:
        dec.refill([n], n, [first])
        keys = [la.keys for la in dec.cache.layers]
        values = [la.values for la in dec.cache.layers]
    else:
        model._ragkit_decode = None  # the previous bucket's buffers go before this one's are made
        keys, values = buffers_like(cache, 1, slots)
        dec = model._ragkit_decode = StaticDecode(model, keys, values, [n], n, [first], graph)
    for k, v, layer in zip(keys, values, cache.layers):
        k[:, :, :n], v[:, :, :n] = layer.keys, layer.values
    del cache
    for tokens in dec.steps(max_new_tokens - 1):
        new.append(tokens[0])
        if tokens[0] in eos:
            break
    return new
