"""Know before you run: a long-context grid's projected peak GPU memory per length and its wall time on a GPU.

Memory per length = the planner's weights (ragkit/planner.py, at the run's quantization) + the KV cache of the
prompt (the planner's bytes per token; MLA: the compressed latent), once for the shared cache and once per
decode row (the runner copies each cell's whole cache into a batch row: :func:`decode_rows`) + the transient
activations of a chunked prefill: those of the measured run's prompt, and where a second, shorter prompt's peak
was measured (``peak_short``) a growth per prompt token between the two (MLA's prefill expands one layer's cached latents into
per-head keys and values: the 4-layer NF4 run grew 2.8 -> 9.2 GiB from 32k to 256k tokens, ~29 KiB per token, so
constant activations over-provisioned 32k by 7 GiB). Time = floors x measured factors:

* prefill floor of one forward call of n tokens on a cache of c: (2 x active parameters x n + per layer
  2 x n x (c + n/2) x heads x (qk + v head dims)) / the GPU's bf16 FLOP/s. Active parameters: the text model
  less embeddings, output head and the routed experts a token does not use (top-k of E).
* decode floor per step: (active weight bytes + output head + KV cache read) / the GPU's HBM bandwidth.
* each factor = a measured time / the floor of the same run (ragkit/configs/gpu_factors.json, the ONE place the
  ceilings and measurements live; benchmarks/gpu_engine.py measures them), taken from the run of the projected
  model's quantization (NF4's dequantizing MoE prefill and host-synced decode are slower than bf16's), else bf16's.
* a forward call costs at least what a short one measured (``short_calls``: 63-64 tokens; NF4 routes the experts
  on the host and dequantizes them per call, ~44 ms per layer on the H200 whatever the tokens), so a prefill call
  takes max(that per layer, factor x its floor): a grid's short calls (a needle near the end, the control's
  stretch) are not free, and a 16k chunk on an empty cache is near that minimum. The prefill factor is solved so
  that the measured fresh prefill projects back to its time.
* a run whose first grid at full-size chunks measured slower than the model (``first_grid``: the same stretches
  took 2-4x as long as in the process's later grids) adds that excess, once, to a grid's first length.

The grid follows the in-process runner (evals/core/decode.py) call by call: with a fixed haystack one group per
length; its cells in order of depth grow the needle-free prompt's cache to their needle (at least the chat
template's head, :data:`TEMPLATE_HEAD` tokens; at most the prompt less :data:`TEMPLATE_TAIL`, the question and
the template's end: at 256k a needle at depth 100 feeds a 29-token tail) and feed their own tail, in chunks of the
measured run's ``prefill_chunk``; the control grows it to its last token and feeds that one (a decode-sized
call). A group's cells decode ``max_new_tokens - 1`` steps (the first token comes from the prefill) in batches
of ``batch_size`` (the runner's CUDA default, 8), each step at the cost of a batch-1 step (decode is
bandwidth-bound; an upper bound too, as answers stop at EOS). Prompt building and model loading are not counted.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ragkit.errors import MemoryPlanError
from ragkit.placement import text_config

FACTORS_FILE = Path(__file__).parent / "configs" / "gpu_factors.json"
FIT_HEADROOM = 0.10  # a length fits when its peak leaves this fraction of the GPU free
TEMPLATE_HEAD = 32  # tokens of a chat prompt before its first haystack token (Tekken's template: 34)
TEMPLATE_TAIL = 32  # tokens after the last haystack token: the needle at depth 100, the question, the template's end


@cache
def gpu_table() -> dict[str, dict[str, Any]]:
    """The GPUs ragkit has ceilings and measured factors for, by short name (``h200``)."""
    return json.loads(FACTORS_FILE.read_text(encoding="utf-8"))["gpus"]


def gpu_named(name: str) -> tuple[str, dict[str, Any]]:
    """(short name, entry) for ``--gpu NAME`` or a CUDA device name ("NVIDIA H200"); MemoryPlanError if unknown."""
    table = gpu_table()
    key = name.lower().replace("nvidia", "").strip().split()[0] if name.strip() else ""
    if key not in table:
        raise MemoryPlanError(f"no measured factors for the GPU {name!r}; ragkit has them for "
                              f"{', '.join(table)} (ragkit/configs/gpu_factors.json): pass --gpu with one of them, "
                              "or measure this GPU with benchmarks/gpu_engine.py and add it there")
    return key, table[key]


def present_gpu() -> str | None:
    """The CUDA device name of GPU 0, or None on a machine without one."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def resolve_gpu(gpu: str | None) -> str:
    """The GPU to project for: ``gpu`` when named, else the present one; MemoryPlanError on a machine without
    a GPU (naming the GPUs it can project for) or for a GPU without measured factors."""
    if gpu is None:
        gpu = present_gpu()
        if gpu is None:
            raise MemoryPlanError(f"there is no CUDA GPU on this machine to project for; name one with --gpu "
                                  f"({', '.join(gpu_table())}: the GPUs with measured factors)")
    return gpu_named(gpu)[0]


def parse_tokens(text: str | int) -> int:
    """A token count as flags write it: ``262144``, ``256k`` (k = 1024)."""
    raw = str(text).strip().lower()
    digits = raw[:-1] if raw.endswith("k") else raw
    if not digits.isdigit() or int(digits) < 1:
        raise MemoryPlanError(f"cannot read the token count {text!r}: write e.g. 262144 or 256k (k = 1024)")
    return int(digits) * (1024 if raw.endswith("k") else 1)


@dataclass(frozen=True)
class Shape:
    """What the floors need of a model: parameters a token uses, bytes they take, the attention shape."""

    active_params: int
    active_bytes: float  # the active weights at the run's storage, plus the output head
    layers: int
    heads: int
    qk_dim: int
    v_dim: int
    kv_bytes_per_token: int
    weights_bytes: int

    def prefill_flops(self, n: int, cached: int = 0) -> float:
        """FLOPs to feed ``n`` tokens on a cache of ``cached`` tokens."""
        attention = 2 * n * (cached + n / 2) * self.heads * (self.qk_dim + self.v_dim)
        return 2 * self.active_params * n + self.layers * attention

    def decode_bytes(self, cache_tokens: int) -> float:
        """Bytes one decode step reads: the active weights and the whole KV cache."""
        return self.active_bytes + self.kv_bytes_per_token * cache_tokens


def shape(plan: Any, config: Any) -> Shape:
    """The :class:`Shape` of a planned model (``plan``: a ragkit.planner.MemoryPlan of ``config``)."""
    tc = text_config(config)
    vocab, hidden = tc.vocab_size, tc.hidden_size
    tied = bool(getattr(tc, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
    head = 0 if tied else vocab * hidden
    experts = getattr(tc, "n_routed_experts", None) or getattr(tc, "num_local_experts", None) or 0
    top_k = getattr(tc, "num_experts_per_tok", None) or 0
    unused = plan.params_routed_experts * (1 - top_k / experts) if experts else 0
    active = int(plan.params - plan.params_vision - vocab * hidden - head - unused)
    heads = tc.num_attention_heads
    if getattr(tc, "kv_lora_rank", None):
        qk, v = tc.qk_nope_head_dim + tc.qk_rope_head_dim, tc.v_head_dim
    else:
        qk = v = getattr(tc, "head_dim", None) or hidden // heads
    per_param = plan.weights_bytes / plan.params
    head_bytes = (head or vocab * hidden) * 2  # the output head stays in the compute dtype (bf16)
    return Shape(active, active * per_param + head_bytes, tc.num_hidden_layers, heads, qk, v,
                 plan.kv.bytes_per_token, plan.weights_bytes)


@dataclass(frozen=True)
class Factors:
    """A GPU's ceilings and the factors measured on it (measured time / floor of the same run)."""

    gpu: str
    name: str
    memory_bytes: int
    flops: float
    bandwidth: float
    prefill: float
    decode: float
    activation_bytes: int  # transient activations of a chunked prefill at the measured prompt, over weights and KV
    activation_bytes_per_token: float  # their growth per prompt token (0: one measurement, taken as constant)
    prefill_chunk: int
    quant: str  # the quantization of the measured run
    call_layer_s: float  # the least a prefill call costs per layer (0: not measured)
    measured_tokens: int  # the prompt tokens ``activation_bytes`` were measured at
    first_grid_s: float  # one-time excess of a process's first grid (0: none measured)
    source: str

    def activations(self, prompt_tokens: int) -> int:
        """Transient bytes of a chunked prefill of ``prompt_tokens`` over weights and KV cache."""
        return int(self.activation_bytes + self.activation_bytes_per_token * (prompt_tokens - self.measured_tokens))

    def call_s(self, s: Shape, n: int, cached: int = 0) -> float:
        """Seconds of one forward call of ``n`` tokens on a cache of ``cached``."""
        return max(self.call_layer_s * s.layers, self.prefill * s.prefill_flops(n, cached) / self.flops)

    def prefill_s(self, s: Shape, n: int, cached: int = 0) -> float:
        """Seconds to feed ``n`` tokens on a cache of ``cached`` in chunks of ``prefill_chunk``."""
        return sum(self.call_s(s, min(self.prefill_chunk, n - i), cached + i)
                   for i in range(0, n, self.prefill_chunk))


def measured_run(gpu: str, quant: str) -> dict[str, Any]:
    """The measured run of ``gpu`` at ``quant`` (bf16's, ``"none"``, where that quantization was not measured)."""
    runs = gpu_table()[gpu]["measured"]
    return runs.get(quant) or runs["none"]


@cache
def factors(gpu: str, quant: str = "none") -> Factors:
    """The measured factors of ``gpu`` (a short name of :func:`gpu_table`) for a model quantized as ``quant``."""
    from dataclasses import replace

    key, entry = gpu_named(gpu)
    m = measured_run(key, quant)
    bench = measured_model_shape(key, m["quant"])
    floor_decode = bench.decode_bytes(m["decode_cache_tokens"]) / entry["hbm_bytes_per_s"]
    copies = 1 + m.get("decode_rows", 0)  # the prompt's cache and each decode row's copy of it
    activations = m["peak_bytes"] - m["weights_bytes"] - bench.kv_bytes_per_token * m["prompt_tokens"] * copies
    per_token = 0.0
    if "peak_short" in m:  # MLA's prefill expands the cached latents of a layer into per-head K and V: ~T bytes
        p = m["peak_short"]
        short_act = p["peak_bytes"] - m["weights_bytes"] - bench.kv_bytes_per_token * p["prompt_tokens"] * copies
        per_token = (activations - short_act) / (m["prompt_tokens"] - p["prompt_tokens"])
    short = m.get("short_calls", {}).get("stretches", [])
    call = statistics.median(t for _, _, t in short) / bench.layers if short else 0.0
    f = Factors(key, entry["name"], entry["memory_bytes"], entry["bf16_flops"], entry["hbm_bytes_per_s"], 1.0,
                m["decode_step_s"] / floor_decode, int(activations), per_token, m["prefill_chunk"], m["quant"], call,
                m["prompt_tokens"], 0.0, m["source"])
    lo, hi = 0.0, 2 * m["prefill_s"] * f.flops / bench.prefill_flops(m["prompt_tokens"])
    for _ in range(60):  # the factor that projects the measured fresh prefill back to its time (monotone)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if replace(f, prefill=mid).prefill_s(bench, m["prompt_tokens"]) < m["prefill_s"] else (lo, mid)
    f = replace(f, prefill=(lo + hi) / 2)
    first = m.get("first_grid", {}).get("stretches", [])
    excess = sum(t - f.prefill_s(bench, n, c) for c, n, t in first)
    return replace(f, first_grid_s=float(max(excess, 0.0)))


def measured_model_shape(gpu: str, quant: str = "none") -> Shape:
    """The Shape of the model the ``quant`` factors of ``gpu`` were measured on (its text model, at its layer
    count)."""
    from ragkit.models import shipped_config
    from ragkit.planner import plan as memory_plan
    from ragkit.placement import load_config

    m = measured_run(gpu, quant)
    full = json.loads(shipped_config(m["model"]).read_text(encoding="utf-8"))
    text = {**full.get("text_config", full), "num_hidden_layers": m["layers"], "dtype": m["dtype"]}
    config, _ = load_config(text)
    return shape(memory_plan(config, context=1, quant=m["quant"]), config)


@dataclass(frozen=True)
class LengthProjection:
    """One length of a grid: its cells, memory and time."""

    length: int
    prompt_tokens: int
    cells: int
    tokens_fed: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    peak_bytes: int
    decode_rows: int  # cells decoding together, each row holding a copy of its prompt's cache (in kv_cache_bytes)
    prefill_s: float
    decode_s: float
    fits: bool
    reason: str

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s


def group_calls(prompt: int, needle_depths: Sequence[float], control: bool) -> list[tuple[int, int]]:
    """(cached, tokens) of each stretch the runner feeds for one group (evals/core/decode.py): cells in order of
    their needle's position grow the needle-free prompt's cache to it and feed their own tail; the control grows
    it to its last token and feeds that one."""
    cached, out = 0, []
    for at in sorted(min(max(int(prompt * d / 100), TEMPLATE_HEAD), prompt - TEMPLATE_TAIL) for d in needle_depths):
        if at > cached:
            out.append((cached, at - cached))
            cached = at
        out.append((at, prompt - at))
    if control:
        out += [(cached, prompt - 1 - cached), (prompt - 1, 1)]
    return [(c, n) for c, n in out if n > 0]


def decode_rows(cells: int, batch_size: int, free_bytes: int, row_bytes: int) -> int:
    """How many of a group's ``cells`` the runner decodes together (evals/core/decode.py): none with batch size 1
    (a cell decodes on the shared cache), else up to ``batch_size``, at least one, as many rows of ``row_bytes``
    (a whole prompt's cache) as fit in half the ``free_bytes``."""
    if batch_size <= 1 or not cells:
        return 0
    return min(cells, batch_size, max(1, free_bytes // 2 // max(row_bytes, 1)))


def project_grid(plan: Any, config: Any, lengths: Sequence[int], depths: Sequence[float], seeds: int,
                 controls: bool, max_new_tokens: int, gpu: str, shared_haystack: bool = True,
                 batch_size: int = 8) -> list[LengthProjection]:
    """The projection of a needle grid per length on ``gpu`` (``plan``: the model's MemoryPlan), lengths run in
    the order given (the first carries the first grid's one-time excess)."""
    f, s = factors(gpu, plan.quant), shape(plan, config)
    budget = f.memory_bytes * (1 - FIT_HEADROOM)
    out = []
    for k, length in enumerate(lengths):
        prompt = length - max_new_tokens
        groups = 1 if shared_haystack else seeds
        needles = [d for d in depths for _ in range(seeds // groups)]
        calls = group_calls(prompt, needles, controls)
        step_s = f.decode * s.decode_bytes(length) / f.bandwidth  # one decode step (a 1-token call costs one)
        prefill = groups * sum(step_s if n == 1 else f.prefill_s(s, n, c) for c, n in calls)
        prefill += f.first_grid_s if k == 0 else 0.0
        cells = len(needles) + (1 if controls else 0)
        decode = groups * -(-cells // batch_size) * max(max_new_tokens - 1, 0) * step_s
        one, activations = s.kv_bytes_per_token * length, f.activations(prompt)
        rows = decode_rows(cells, batch_size, f.memory_bytes - s.weights_bytes - one, one)
        kv = one * (1 + rows)
        peak = s.weights_bytes + kv + activations
        fits = peak <= budget
        reason = "" if fits else (
            f"needs {peak / 1e9:,.1f} GB (weights {s.weights_bytes / 1e9:,.1f} + KV cache {kv / 1e9:,.1f} + "
            f"activations {activations / 1e9:,.1f}) of {budget / 1e9:,.1f} GB usable on one {f.name} "
            f"({FIT_HEADROOM:.0%} kept free)")
        out.append(LengthProjection(length, prompt, groups * cells, groups * sum(n for _, n in calls),
                                    s.weights_bytes, kv, activations, peak, rows, prefill, decode, fits, reason))
    return out


def table(rows: Sequence[LengthProjection], gpu: str, quant: str = "none") -> str:
    """The projection as text: a pandas table per length, the total, what it rests on (``quant``: the model's)."""
    import pandas as pd

    f = factors(gpu, quant)
    frame = pd.DataFrame([{
        "length": r.length, "cells": r.cells, "tokens fed": r.tokens_fed,
        "weights GB": round(r.weights_bytes / 1e9, 2), "decode rows": r.decode_rows,
        "KV cache GB": round(r.kv_cache_bytes / 1e9, 2),
        "activations GB": round(r.activation_bytes / 1e9, 2), "peak GB": round(r.peak_bytes / 1e9, 2),
        "fits": "yes" if r.fits else "NO", "prefill s": round(r.prefill_s, 2), "decode s": round(r.decode_s, 2),
        "wall s": round(r.seconds, 2)} for r in rows])
    fitting = [r for r in rows if r.fits]
    lines = [f"Projected on one {f.name} ({f.memory_bytes / 2**30:,.0f} GiB; bf16 {f.flops / 1e12:,.0f} TFLOP/s, "
             f"HBM {f.bandwidth / 1e12:,.1f} TB/s)", frame.to_string(index=False),
             f"total wall time of the lengths that fit: {sum(r.seconds for r in fitting):,.1f} s "
             f"({len(fitting)} of {len(rows)} lengths; model loading not counted)",
             f"factors: prefill {f.prefill:.2f} x FLOP floor"
             + (f" per call, at least {f.call_layer_s * 1e3:.1f} ms per layer" if f.call_layer_s else "")
             + (f", first grid +{f.first_grid_s:.2f} s once" if f.first_grid_s else "")
             + f", decode {f.decode:.2f} x bandwidth floor, "
             f"activations {f.activation_bytes / 2**30:.2f} GiB at {f.measured_tokens:,} tokens"
             + (f" + {f.activation_bytes_per_token / 1024:.1f} KiB per token" if f.activation_bytes_per_token else "")
             + f" (prefill chunks of {f.prefill_chunk:,}); "
             f"measured with quantization {f.quant} in {f.source}"]
    lines += [f"refused: length {r.length}: {r.reason}" for r in rows if not r.fits]
    return "\n".join(lines) + "\n"
