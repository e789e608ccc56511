"""Know before you run: a long-context grid's projected peak GPU memory per length and its wall time on a GPU.

Memory per length = the planner's weights (ragkit/planner.py, at the run's quantization) + the KV cache of the
prompt (the planner's bytes per token; MLA: the compressed latent) + the transient activations of a chunked
prefill, which the benchmark measured to be constant whatever the prompt length (they depend on the chunk, not
the prompt). Time = floors x measured factors:

* prefill floor: (2 x active parameters x tokens fed + per layer 2 x n x (c + n/2) x heads x (qk + v head dims)
  for each stretch of n tokens fed on a cache of c) / the GPU's bf16 FLOP/s. Active parameters: the text model
  less embeddings, output head and the routed experts a token does not use (top-k of E).
* decode floor per step: (active weight bytes + output head + KV cache read) / the GPU's HBM bandwidth.
* each factor = a measured time / the floor of the same run (ragkit/configs/gpu_factors.json, the ONE place the
  ceilings and measurements live; benchmarks/gpu_engine.py measures them), taken from the run of the projected
  model's quantization (NF4's dequantizing MoE prefill and host-synced decode are slower than bf16's), else bf16's.
  A run that also measured a short fresh prefill (``prefill_short``) splits prefill time into a cost per token and
  layer (NF4: dequantizing experts per chunk, linear in the tokens) and a factor on the FLOP floor, solved from
  the two prefills (all per-token when the two scale with the tokens alone, as the 4-layer NF4 run's do).

The grid follows the in-process runner (evals/core/decode.py): with a fixed haystack one group per length computes
the needle-free prompt once and each needle cell its tail after its depth; a group's cells decode
``max_new_tokens`` steps in batches of ``batch_size`` (the runner's CUDA default, 8), each step at the cost of a
batch-1 step (decode is bandwidth-bound; an upper bound too, as answers stop at EOS). Model loading is not
counted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ragkit.errors import MemoryPlanError
from ragkit.placement import text_config

FACTORS_FILE = Path(__file__).parent / "configs" / "gpu_factors.json"
FIT_HEADROOM = 0.10  # a length fits when its peak leaves this fraction of the GPU free


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
    activation_bytes: int  # transient activations of a chunked prefill, over weights and KV cache
    prefill_chunk: int
    quant: str  # the quantization of the measured run
    prefill_token_layer_s: float  # prefill seconds per token fed and layer besides the FLOP floor's (0: none)
    source: str


def measured_run(gpu: str, quant: str) -> dict[str, Any]:
    """The measured run of ``gpu`` at ``quant`` (bf16's, ``"none"``, where that quantization was not measured)."""
    runs = gpu_table()[gpu]["measured"]
    return runs.get(quant) or runs["none"]


@cache
def factors(gpu: str, quant: str = "none") -> Factors:
    """The measured factors of ``gpu`` (a short name of :func:`gpu_table`) for a model quantized as ``quant``."""
    key, entry = gpu_named(gpu)
    m = measured_run(key, quant)
    bench = measured_model_shape(key, m["quant"])
    floor_prefill = bench.prefill_flops(m["prompt_tokens"]) / entry["bf16_flops"]
    floor_decode = bench.decode_bytes(m["decode_cache_tokens"]) / entry["hbm_bytes_per_s"]
    activations = m["peak_bytes"] - m["weights_bytes"] - bench.kv_bytes_per_token * m["prompt_tokens"]
    per_token, prefill = 0.0, m["prefill_s"] / floor_prefill
    if "prefill_short" in m:  # t = per_token x layers x n + factor x floor(n), through both measured prefills
        short = m["prefill_short"]
        x1, y1, t1 = bench.layers * m["prompt_tokens"], floor_prefill, m["prefill_s"]
        x2, t2 = bench.layers * short["prompt_tokens"], short["prefill_s"]
        y2 = bench.prefill_flops(short["prompt_tokens"]) / entry["bf16_flops"]
        per_token = (t1 * y2 - t2 * y1) / (x1 * y2 - x2 * y1)
        prefill = (t1 - per_token * x1) / y1
        if prefill < 0:  # the two are nearly proportional to the tokens: all per-token cost (fit the longer one)
            per_token, prefill = t1 / x1, 0.0
    return Factors(key, entry["name"], entry["memory_bytes"], entry["bf16_flops"], entry["hbm_bytes_per_s"],
                   prefill, m["decode_step_s"] / floor_decode, int(activations), m["prefill_chunk"], m["quant"],
                   per_token, m["source"])


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
    prefill_s: float
    decode_s: float
    fits: bool
    reason: str

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s


def project_grid(plan: Any, config: Any, lengths: Sequence[int], depths: Sequence[float], seeds: int,
                 controls: bool, max_new_tokens: int, gpu: str, shared_haystack: bool = True,
                 batch_size: int = 8) -> list[LengthProjection]:
    """The projection of a needle grid per length on ``gpu`` (``plan``: the model's MemoryPlan)."""
    f, s = factors(gpu, plan.quant), shape(plan, config)
    budget = f.memory_bytes * (1 - FIT_HEADROOM)
    out = []
    for length in lengths:
        prompt = length - max_new_tokens
        groups = 1 if shared_haystack else seeds
        needles = [d for d in depths for _ in range(seeds)]
        # each group: the needle-free prompt once, then each needle cell's tail after its depth
        flops = groups * s.prefill_flops(prompt)
        fed = groups * prompt
        for d in needles:
            at = int(prompt * d / 100)
            flops += s.prefill_flops(prompt - at, at)
            fed += prompt - at
        cells = len(needles) + (groups if controls else 0)
        batches = groups * -(-cells // (groups * batch_size))  # ceil per group
        decode = batches * max_new_tokens * f.decode * s.decode_bytes(length) / f.bandwidth
        kv = s.kv_bytes_per_token * length
        peak = s.weights_bytes + kv + f.activation_bytes
        fits = peak <= budget
        reason = "" if fits else (
            f"needs {peak / 1e9:,.1f} GB (weights {s.weights_bytes / 1e9:,.1f} + KV cache {kv / 1e9:,.1f} + "
            f"activations {f.activation_bytes / 1e9:,.1f}) of {budget / 1e9:,.1f} GB usable on one {f.name} "
            f"({FIT_HEADROOM:.0%} kept free)")
        out.append(LengthProjection(length, prompt, cells, fed, s.weights_bytes, kv, f.activation_bytes, peak,
                                    f.prefill * flops / f.flops + f.prefill_token_layer_s * s.layers * fed, decode,
                                    fits, reason))
    return out


def table(rows: Sequence[LengthProjection], gpu: str, quant: str = "none") -> str:
    """The projection as text: a pandas table per length, the total, what it rests on (``quant``: the model's)."""
    import pandas as pd

    f = factors(gpu, quant)
    frame = pd.DataFrame([{
        "length": r.length, "cells": r.cells, "tokens fed": r.tokens_fed,
        "weights GB": round(r.weights_bytes / 1e9, 2), "KV cache GB": round(r.kv_cache_bytes / 1e9, 2),
        "activations GB": round(r.activation_bytes / 1e9, 2), "peak GB": round(r.peak_bytes / 1e9, 2),
        "fits": "yes" if r.fits else "NO", "prefill s": round(r.prefill_s, 2), "decode s": round(r.decode_s, 2),
        "wall s": round(r.seconds, 2)} for r in rows])
    fitting = [r for r in rows if r.fits]
    lines = [f"Projected on one {f.name} ({f.memory_bytes / 2**30:,.0f} GiB; bf16 {f.flops / 1e12:,.0f} TFLOP/s, "
             f"HBM {f.bandwidth / 1e12:,.1f} TB/s)", frame.to_string(index=False),
             f"total wall time of the lengths that fit: {sum(r.seconds for r in fitting):,.1f} s "
             f"({len(fitting)} of {len(rows)} lengths; model loading not counted)",
             f"factors: prefill {f.prefill:.2f} x FLOP floor"
             + (f" + {f.prefill_token_layer_s * 1e9:.1f} ns per token and layer" if f.prefill_token_layer_s else "")
             + f", decode {f.decode:.2f} x bandwidth floor, "
             f"activations {f.activation_bytes / 2**30:.2f} GiB (prefill chunks of {f.prefill_chunk:,}); "
             f"measured with quantization {f.quant} in {f.source}"]
    lines += [f"refused: length {r.length}: {r.reason}" for r in rows if not r.fits]
    return "\n".join(lines) + "\n"
