"""Greedy decoding that shares a prompt prefix's KV cache across the cells of a group, and batches their decoding.

Prefill. Cells of one length share the haystack up to their needle. The group's ``base`` is the needle-free
prompt (the control cell): each cell's prompt equals ``base`` up to its needle. Cells are visited in order of
that shared prefix; one DynamicCache holds ``base[:p]`` and grows only forward. A cell feeds its own tokens
after ``p`` (batch 1), and the cache is cropped back to ``p`` — so the haystack prefix is computed once for the
whole group instead of once per cell. Cells with the same prompt (a JSON run's free and constrained answers)
are visited one after the other and the prompt is prefilled once: the first cell's prompt stays in the cache
until a cell with another prompt comes.

Decoding. With ``batch_size`` 1 a cell decodes on the shared cache right after its prefill. With ``batch_size``
N > 1 the cell's whole KV (shared prefix + own tokens) is copied into one row of a batch cache, left-padded to
the batch's longest prompt, before the shared cache is cropped back; N cells (fewer at the group's end) then
decode together as ``generate()`` does with left padding: the attention mask hides the pads, each row's
position ids count its own tokens, and a row leaves the batch when it reaches EOS or ``max_new_tokens``.

Batching pays where one decode step of N rows costs about what one row does: on a GPU, where a small model's
decode steps are bound by kernel launches, so the default there is 8 rows (more rarely helps: a needle group
holds depths x seeds + 1 cells, and each row holds a whole prompt's KV). On a CPU the prefill dominates (at
1k tokens x 5 depths, batch 4 saved 3-17% over batch 1 on a loaded 2-core machine), so the default there
stays 1, the path that holds the least memory. Memory: a batch holds its rows' KV besides the shared cache;
on CUDA fewer rows are taken when they would not fit in half the free memory.

Static decode. On one GPU the batch's rows get ``max_new_tokens`` free slots after the prompt and decode on them as a
static cache, each step replayed as a CUDA graph (:mod:`ragkit.graph_decode`; H200, 7B-dense shape: a batch-8 step at
an 8k cache 11.7 ms where the DynamicCache step of one row took 40-100 ms); rows that end stay in the graph.

Attention. On CUDA the model is switched to ragkit's mask-free attention (:mod:`ragkit.attention`): a cell's
tail on the shared cache attends lower-right causally without the query x key mask transformers' ``sdpa`` builds
(on the H200, 7B-dense shape: a 32k tail on a 46-token cache 87 -> 45 us/token, fresh 43; at 128k, half on half,
19.2 -> 7.7 s and 36.5 -> 16.1 GiB transient), and MLA models decode on their latent cache (:mod:`ragkit.mla`).
On a CPU SDPA has no lower-right kernel, so the model is left as it is. ``prefill_chunk`` feeds long stretches
in chunks of that many tokens (activation memory bounded by the chunk instead of the prompt). Default
(:func:`default_prefill_chunk`): on CUDA the largest power of two up to 16,384 whose estimated activations take at
most a quarter of the free GPU memory (real-width Mistral-4 NF4: a 256k cell peaks at 17.4 GiB for 4 layers with
16k chunks, where unchunked it would need ~137 GB for 36); on a CPU one call, as before.

Accounting. ``computed_tokens`` of a row counts every prompt token fed for it, including the stretch of the
shared prefix its prefill was the first to need (the first cell of a group computes the prefix up to its needle,
the next one the stretch to its own, ...), so a group's rows add up to the prompt tokens the model was fed and
``reused_tokens`` (= prompt tokens - computed) is what came from cache computed for an earlier cell.

Constrained answers. ``run_group(..., processors=)`` gives a prompt a logits processor (``(input_ids, scores) ->
scores``, as ``generate`` calls one; ragkit.structured's JSON-schema grammar): it masks the logits before every
greedy choice of that prompt's answer, batched or not. ``decode_seconds`` of a row is its time after the prefill
(its token choices and decode steps), which the per-token cost of a grammar is measured on.

Answers equal ``model.generate`` greedy answers (tests/evals/needle/test_needle_decode.py checks it on the real model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ragkit import graph_decode
from ragkit.attention import use_lower_right


@dataclass
class Decoded:
    index: int  # position of the prompt in the group's input list
    new_ids: list[int]
    reused_tokens: int  # prompt tokens whose KV came from the shared cache, computed for an earlier cell
    computed_tokens: int  # prompt tokens fed to the model for this cell, shared-prefix tokens it computed first included
    seconds: float  # this cell's prefill, plus its share of each batched decode step it took part in
    decode_seconds: float = 0.0  # of ``seconds``, the part after the prefill: token choices and decode steps


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def default_batch_size(device: torch.device | str) -> int:
    """Cells decoded together by default: 8 on CUDA (launch-bound decode steps), 1 elsewhere (see module doc)."""
    return 8 if torch.device(device).type == "cuda" else 1


MAX_PREFILL_CHUNK = 16_384  # the chunk the H200 measurements used (benchmarks/results/gpu_engine_h200)


def activation_bytes_per_token(config) -> int:
    """A generous estimate of one prefill token's transient activations in one layer (bytes, 2-byte dtype, x4 for
    the copies a forward keeps alive): the MLP's or the active experts' up/gate/act rows, the residual stream and
    the attention projections. Attention scores are not counted: SDPA's flash kernels never hold them."""
    text = getattr(config, "text_config", None) or config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    mlp = max(getattr(text, "intermediate_size", 0) or 0,
              (getattr(text, "num_experts_per_tok", 0) or 0) * (getattr(text, "moe_intermediate_size", 0) or 0))
    return 2 * 4 * (3 * mlp + 6 * hidden + 4 * heads * head_dim)


def default_prefill_chunk(model) -> int | None:
    """Tokens fed per forward call by default: None (the whole stretch at once) off CUDA; on CUDA the largest power
    of two <= MAX_PREFILL_CHUNK whose :func:`activation_bytes_per_token` fit in a quarter of the free memory."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    chunk, per_token = MAX_PREFILL_CHUNK, activation_bytes_per_token(model.config)
    while chunk > 256 and chunk * per_token > free / 4:
        chunk //= 2
    return chunk


class GreedyDecoder:
    """Greedy decoding on a Hugging Face causal LM with prefix-cache reuse within a group of prompts.

    ``batch_size``: cells decoded together (None: :func:`default_batch_size` of the model's device); 1 decodes
    each cell on the shared cache as soon as it is prefilled. ``prefill_chunk``: tokens per forward call while
    prefilling (None: :func:`default_prefill_chunk`).
    """

    def __init__(self, model, eos_ids: Sequence[int], max_new_tokens: int, batch_size: int | None = None,
                 prefill_chunk: int | None = None):
        self.model, self.eos, self.max_new_tokens = model, set(eos_ids), max_new_tokens
        self.device = next(model.parameters()).device
        self.batch_size = default_batch_size(self.device) if batch_size is None else batch_size
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = default_prefill_chunk(model) if prefill_chunk is None else prefill_chunk
        if self.device.type == "cuda":  # tails on the shared cache without a query x key mask (ragkit.attention)
            use_lower_right(model)
        self.static = graph_decode.supported(model)  # batches decode on a static cache, as CUDA graphs

    @torch.inference_mode()
    def _forward(self, ids: Sequence[int], cache: DynamicCache) -> torch.Tensor:
        """Feed ``ids`` on ``cache`` (``prefill_chunk`` tokens per call at most); the logits after the last one."""
        step = self.prefill_chunk or max(len(ids), 1)
        for start in range(0, len(ids), step):
            x = torch.tensor([list(ids[start:start + step])], device=self.device)
            # logits of the last position only: the full-vocabulary head over every prompt token is wasted work
            logits = self.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        return logits

    def _choosers(self, prompts: Sequence[Sequence[int]], processors: Sequence[Any] | None) -> list[_Chooser]:
        return [_Chooser(p, None if processors is None else processors[i], self.max_new_tokens)
                for i, p in enumerate(prompts)]

    def _grow(self, new: list[int], tok: int) -> bool:
        """Append greedy token ``tok`` to the answer ``new`` unless it ends it; True while the answer goes on."""
        if tok in self.eos:
            return False
        new.append(tok)
        return len(new) < self.max_new_tokens

    @torch.inference_mode()
    def run_group(self, prompts: Sequence[Sequence[int]], base: Sequence[int] | None = None,
                  processors: Sequence[Any] | None = None) -> Iterator[Decoded]:
        """Decode every prompt; yields results as they finish (in shared-prefix order, not input order).
        ``processors``: one logits processor (or None) per prompt, applied before each of its greedy choices."""
        choose = self._choosers(prompts, processors)
        shared = [min(common_prefix(p, base), len(p) - 1) if base is not None else 0 for p in prompts]
        # by shared prefix; the same prompt twice (free and constrained answers) adjacent, so it is prefilled once
        order = sorted(range(len(prompts)), key=lambda j: (shared[j], hash(tuple(prompts[j]))))
        prefix = _Prefix(self._forward, base, DynamicCache(config=self.model.config))
        # batch rows are plain full-attention layers; sliding-window or other caches decode one cell at a time
        if self.batch_size > 1 and all(type(layer) is DynamicLayer for layer in prefix.cache.layers):
            yield from self._batched(prompts, shared, order, prefix, choose)
            return
        for i in order:
            t0 = time.perf_counter()
            logits, computed = prefix.prefill(prompts[i], shared[i])
            first, t1 = logits, time.perf_counter()
            new: list[int] = []
            for _ in range(self.max_new_tokens):
                if not self._grow(new, choose[i](logits, new)):
                    break
                logits = self._forward([new[-1]], prefix.cache)
            prefix.release(prompts[i], first)
            end = time.perf_counter()
            yield Decoded(i, new, len(prompts[i]) - computed, computed, end - t0, end - t1)

    def _batched(self, prompts: Sequence[Sequence[int]], shared: list[int], order: list[int],
                 prefix: _Prefix, choose: list[_Chooser]) -> Iterator[Decoded]:
        """Prefill cells one at a time on the shared cache, decode them ``batch_size`` at a time."""
        k = 0
        while k < len(order):
            wanted = order[k:k + self.batch_size]
            batch: _Batch | None = None
            for i in wanted:
                t0 = time.perf_counter()
                k += 1
                logits, computed = prefix.prefill(prompts[i], shared[i])
                row = Decoded(i, [], len(prompts[i]) - computed, computed, 0.0)
                first = logits
                t1 = time.perf_counter()
                goes_on = self.max_new_tokens > 0 and self._grow(row.new_ids, choose[i](logits, row.new_ids))
                row.decode_seconds = time.perf_counter() - t1
                if goes_on:
                    if batch is None:
                        width = max(len(prompts[j]) for j in wanted)
                        room = graph_decode.static_slots(width + self.max_new_tokens) - width if self.static else 0
                        rows = self._rows_that_fit(prefix.cache, width + room, len(wanted))
                        batch = _Batch(prefix.cache, rows, width, room)
                    batch.add(row, prefix.cache)
                prefix.release(prompts[i], first)
                row.seconds = time.perf_counter() - t0
                if not goes_on:
                    yield row
                if batch is not None and batch.full:
                    break
            if batch is not None:
                static = self.static and all(c.processor is None for c in choose)  # a grammar masks on the CPU side
                yield from self._decode_static(batch) if static else self._decode(batch, choose)

    def _decode_static(self, batch: _Batch) -> Iterator[Decoded]:
        """As :meth:`_decode`, on the batch's buffers as a static cache (:class:`ragkit.graph_decode.StaticDecode`):
        rows that end stay in the graph, their later tokens dropped."""
        rows, n = batch.rows, len(batch.rows)
        steps = graph_decode.StaticDecode(
            self.model, [k[:n] for k in batch.keys], [v[:n] for v in batch.values],
            [r.reused_tokens + r.computed_tokens for r in rows], batch.width, [r.new_ids[-1] for r in rows])
        live = list(range(n))
        t0 = time.perf_counter()
        for tokens in steps.steps(self.max_new_tokens - 1):
            now = time.perf_counter()
            share, t0 = (now - t0) / len(live), now
            for j in list(live):
                rows[j].seconds += share
                rows[j].decode_seconds += share
                if not self._grow(rows[j].new_ids, tokens[j]):
                    live.remove(j)
                    yield rows[j]
            if not live:
                return

    def _decode(self, batch: _Batch, choose: list[_Chooser]) -> Iterator[Decoded]:
        """Greedy steps over the batch's rows until every row has ended; a row is yielded when it ends."""
        rows = batch.rows
        cache = DynamicCache(batch.drain(), config=self.model.config)
        lengths = torch.tensor([r.reused_tokens + r.computed_tokens for r in rows], device=self.device)
        mask = (torch.arange(batch.width, device=self.device) >= batch.width - lengths[:, None]).long()
        step = 0
        while rows:
            t0 = time.perf_counter()
            tokens = torch.tensor([[r.new_ids[-1]] for r in rows], device=self.device)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=(lengths + step)[:, None],
                             cache=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]
            best = [choose[r.index](logits[j], r.new_ids) for j, r in enumerate(rows)]
            step += 1
            share = (time.perf_counter() - t0) / len(rows)
            keep = []
            for j, (row, tok) in enumerate(zip(rows, best)):
                row.seconds += share
                row.decode_seconds += share
                if self._grow(row.new_ids, tok):
                    keep.append(j)
                else:
                    yield row
            if len(keep) < len(rows) and keep:
                idx = torch.tensor(keep)  # CPU indices select on any device
                cache.batch_select_indices(idx)
                mask, lengths = mask[idx.to(mask.device)], lengths[idx.to(lengths.device)]
            rows = [rows[j] for j in keep]

    def _rows_that_fit(self, cache: DynamicCache, width: int, wanted: int) -> int:
        """``wanted``, or fewer on CUDA where that many rows of ``width`` positions would take more than half the
        memory free on a device the cache lives on (PyTorch's cached free blocks count as free)."""
        per_row: dict[torch.device, int] = {}
        for layer in cache.layers:
            k, v = layer.keys, layer.values
            per_row[k.device] = per_row.get(k.device, 0) + width * (
                k.shape[1] * k.shape[3] * k.element_size() + v.shape[1] * v.shape[3] * v.element_size())
        rows = wanted
        for device, need in per_row.items():
            if device.type == "cuda":
                free = torch.cuda.mem_get_info(device)[0]
                free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
                rows = min(rows, max(1, free // 2 // need))
        return rows


class _Chooser:
    """The greedy choice of one prompt's next token: the argmax, after its logits processor when it has one
    (which sees the prompt and the answer so far as ``input_ids``, kept in one preallocated row)."""

    def __init__(self, prompt: Sequence[int], processor: Any, max_new_tokens: int):
        self.processor, self.n_prompt = processor, len(prompt)
        self.ids = None
        if processor is not None:
            self.ids = torch.empty(1, len(prompt) + max_new_tokens, dtype=torch.long)
            self.ids[0, :len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)

    def __call__(self, logits: torch.Tensor, new: Sequence[int]) -> int:
        if self.processor is None:
            return int(torch.argmax(logits))
        n = self.n_prompt + len(new)
        if new:
            self.ids[0, n - 1] = new[-1]
        scores = self.processor(self.ids[:, :n], logits[None].to(torch.float32, copy=True))  # as generate's float32
        return int(torch.argmax(scores[0]))


class _Prefix:
    """The group's one cache: ``base[:cached]``, plus one cell's own tokens between ``prefill`` and ``release``
    (and, after ``release``, that cell's prompt, until a cell with another prompt comes)."""

    def __init__(self, forward: Callable[[Sequence[int], DynamicCache], torch.Tensor], base: Sequence[int] | None,
                 cache: DynamicCache):
        self.forward, self.base, self.cache, self.cached = forward, base, cache, 0
        self.last: tuple[tuple[int, ...], torch.Tensor] | None = None  # the prompt kept after base[:cached], its logits

    def prefill(self, ids: Sequence[int], p: int) -> tuple[torch.Tensor, int]:
        """Bring the cache to ``base[:p]``, feed ``ids[p:]``; the logits after the prompt's last token and the
        tokens fed for this cell: its own ``len(ids) - p`` plus the shared-prefix tokens the cache lacked (the
        first cell to need a stretch of the prefix is the one that computes it, so a group's ``computed``
        add up to the tokens the model was fed). The prompt the last cell kept (:meth:`release`) costs nothing."""
        if self.last is not None:
            kept, logits = self.last
            self.last = None
            if kept == tuple(ids):
                return logits, 0
            _crop_to(self.cache, self.cached)
        grown = 0
        if p > self.cached:
            self.forward(self.base[self.cached:p], self.cache)
            grown, self.cached = p - self.cached, p
        elif p < self.cached:
            _crop_to(self.cache, p)
            self.cached = p
        return self.forward(ids[p:], self.cache), grown + len(ids) - p

    def release(self, ids: Sequence[int], logits: torch.Tensor) -> None:
        """Drop the cell's answer tokens, keeping its prompt (and the logits after it) for a next cell with the
        same prompt; any other next cell crops back to the shared prefix."""
        _crop_to(self.cache, len(ids))
        self.last = (tuple(ids), logits)


class _Batch:
    """KV rows left-padded to ``width`` positions (and ``room`` free ones after them for a static-cache decode),
    filled one prefilled cell at a time from the shared cache."""

    def __init__(self, cache: DynamicCache, rows: int, width: int, room: int = 0):
        self.width, self.capacity, self.rows = width, rows, []
        self.keys, self.values = graph_decode.buffers_like(cache, rows, width + room)

    @property
    def full(self) -> bool:
        return len(self.rows) == self.capacity

    def add(self, row: Decoded, cache: DynamicCache) -> None:
        """Copy the cache (this cell's whole prompt) into the next row, right-aligned."""
        r, n = len(self.rows), cache.get_seq_length()
        for dst_k, dst_v, layer in zip(self.keys, self.values, cache.layers):
            dst_k[r, :, self.width - n:self.width] = layer.keys[0, :, :n]
            dst_v[r, :, self.width - n:self.width] = layer.values[0, :, :n]
        self.rows.append(row)

    def drain(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's filled rows, letting go of this batch's copy as the DynamicCache takes its own."""
        n = len(self.rows)
        while self.keys:
            yield self.keys.pop(0)[:n], self.values.pop(0)[:n]


def _crop_to(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of the cache (transformers 5 crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
