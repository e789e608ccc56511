"""Issue 15's proof: real-width Mistral-Small-4 with 4 MoE layers, NF4 through ragkit's loader, Tekken tokenizer,
run as ``python -m evals.needle`` (benchmarks/mistral4_needle.sh runs every step on one GPU).

    python -m benchmarks.mistral4_needle tokenizer TOK_DIR                  # needs mistral-common (CPU is fine)
    python -m benchmarks.mistral4_needle write CKPT --tokenizer TOK_DIR [--layers 4] [--tiny]
    python -m benchmarks.mistral4_needle layers CKPT --run RUN_DIR [--plan PLAN.txt] --out RESULT.json

``tokenizer``: the reasoning Tekken tokenizer of ragkit.tekken.save_tokenizer (mistral-common's shipped 131k
vocabulary): ``tekken.json`` plus the Hugging Face files, which load without mistral-common (a GPU machine
without it gets this folder carried). ``write``: the random FP8 checkpoint of benchmarks/moe_nf4_gpu.py
(Mistral3ForConditionalGeneration layout, 128x128 blocks) at the Tekken vocabulary, with that tokenizer beside
it; ``--tiny``: the toy width of moe_nf4_gpu's CPU dry run (hidden 256, 16 experts), for tests. ``layers``:
loads CKPT as the needle run does (ragkit NF4, the runner's attention), times each decoder layer's share of a
fresh prefill of each length (``--chunk`` tokens per forward call, as the run) and of ``--steps`` decode steps
on that cache (CUDA-synchronized forward hooks; ``rest``: embeddings, final norm, head and the calls'
overhead), and 64-token calls on that cache (the least a call costs, which ragkit.projection models), and writes one JSON with them, the needle run's cells, its measured-vs-projected table per length,
``--plan``'s text and the grid extrapolated to the full 36-layer model (:func:`extrapolate`).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

TOKENIZER_FILES = ("tekken.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TEKKEN_VOCAB = 131_072  # Mistral-Small-4's vocabulary, the shipped Tekken file's
SHORT_CALL, SHORT_REPEATS = 64, 4  # the short prefill calls timed on each length's cache (ragkit.projection)
FULL_MODEL = "mistralai/Mistral-Small-4-119B-2603"  # what the 4-layer figures extrapolate to (its shipped config)


def write_tokenizer(directory: Path) -> None:
    from ragkit import tekken

    tokenizer = tekken.save_tokenizer(directory)
    print(f"wrote the Tekken tokenizer ({len(tokenizer):,} tokens) to {directory}", flush=True)


def write(ckpt: Path, tokenizer: Path | None, layers: int, tiny: bool) -> None:
    """The FP8 checkpoint at the Tekken vocabulary with the tokenizer of ``tokenizer`` (written here if None)."""
    import benchmarks.moe_nf4_gpu as moe

    t = time.perf_counter()
    moe.write_checkpoint(ckpt, layers, small=tiny, vocab_size=TEKKEN_VOCAB)
    if tokenizer is None:
        write_tokenizer(ckpt)
    else:
        missing = [f for f in TOKENIZER_FILES if not (tokenizer / f).is_file()]
        if missing:
            raise SystemExit(f"{tokenizer} lacks {', '.join(missing)}: write it with "
                             f"`python -m benchmarks.mistral4_needle tokenizer {tokenizer}`")
        for f in TOKENIZER_FILES:
            shutil.copy(tokenizer / f, ckpt / f)
    print(f"checkpoint {ckpt} ({layers} layers{', tiny' if tiny else ''}) in {time.perf_counter() - t:.1f} s",
          flush=True)


class LayerClock:
    """Seconds spent in each decoder layer while on (forward hooks that synchronize CUDA around each layer)."""

    def __init__(self, layers: Sequence[Any], sync: Any):
        self.sync, self.on, self.seconds = sync, False, [0.0] * len(layers)
        self._start = 0.0
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._enter)
            layer.register_forward_hook(lambda *_, i=i: self._leave(i))

    def _enter(self, *_: Any) -> None:
        if self.on:
            self.sync()
            self._start = time.perf_counter()

    def _leave(self, i: int) -> None:
        if self.on:
            self.sync()
            self.seconds[i] += time.perf_counter() - self._start

    def timed(self, fn: Any) -> tuple[float, list[float]]:
        """(wall seconds of ``fn()``, seconds per layer during it)."""
        self.seconds = [0.0] * len(self.seconds)
        self.on = True
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        wall = time.perf_counter() - t
        self.on = False
        return wall, list(self.seconds)


def layer_times(ckpt: Path, lengths: Sequence[int], chunk: int | None, steps: int, device: str) -> dict[str, Any]:
    """Per decoder layer: its time in a fresh prefill of each length and per decode step on that cache; on CUDA
    then the runner's static-cache decode steps (1 and 4 rows on the shortest length: ms per step, captured as a
    CUDA graph or not)."""
    import torch
    from transformers import DynamicCache

    from evals.core.decode import GreedyDecoder, _crop_to
    from evals.core.targets import load_target

    t = time.perf_counter()
    target = load_target(str(ckpt), "nf4", "bfloat16", device, max_new_tokens=steps)
    load_s = time.perf_counter() - t
    model = target.model
    cuda = next(model.parameters()).device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    decoder = GreedyDecoder(model, target.eos_ids, steps, batch_size=1, prefill_chunk=chunk)  # the run's attention
    layers = model.get_decoder().layers
    clock = LayerClock(layers, sync)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"load_s": load_s, "layers": len(layers), "prefill_chunk": decoder.prefill_chunk,
                           "decode_steps": steps, "by_length": [],
                           "weights_bytes": torch.cuda.memory_allocated() if cuda else None}
    warm = torch.randint(1000, vocab, (min(4096, min(lengths)),), generator=gen).tolist()
    decoder._forward(warm, DynamicCache(config=model.config))  # kernels and allocator warmed, not reported
    for n in lengths:
        ids = torch.randint(1000, vocab, (n,), generator=gen).tolist()
        cache = DynamicCache(config=model.config)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        prefill_s, prefill_layers = clock.timed(lambda: decoder._forward(ids, cache))
        step_walls, step_layers = [], []
        for k in range(steps):
            wall, per = clock.timed(lambda: decoder._forward([ids[k]], cache))
            step_walls.append(wall)
            step_layers.append(per)
        unhooked, short = [], []
        for k in range(steps):  # the same steps without the per-layer synchronization
            sync()
            t = time.perf_counter()
            decoder._forward([ids[k]], cache)
            sync()
            unhooked.append(time.perf_counter() - t)
        for k in range(SHORT_REPEATS):  # a needle's tail near the end: what one short call costs at least
            _crop_to(cache, n)
            sync()
            t = time.perf_counter()
            decoder._forward(ids[k:k + SHORT_CALL], cache)
            sync()
            short.append(time.perf_counter() - t)
        per_layer_ms = [statistics.median(s[i] for s in step_layers) * 1e3 for i in range(len(layers))]
        out["by_length"].append({
            "length": n, "prefill_s": prefill_s, "prefill_s_per_layer": prefill_layers,
            "prefill_rest_s": prefill_s - sum(prefill_layers),
            "decode_step_ms": statistics.median(step_walls) * 1e3,
            "decode_step_ms_unhooked": statistics.median(unhooked) * 1e3,
            "decode_ms_per_layer": per_layer_ms,
            "decode_rest_ms": statistics.median(step_walls) * 1e3 - sum(per_layer_ms),
            "short_call_tokens": SHORT_CALL, "short_call_s": short,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None})
        print("layers", json.dumps(out["by_length"][-1]), flush=True)
        del cache
    if cuda:  # the runner's decode on one GPU: a static cache, each step a CUDA graph where nothing needs the host
        from benchmarks.gpu_engine import _static_decode

        attn = model.config._attn_implementation  # the clock's hooks are off outside timed(): nothing syncs
        out["static_decode"] = [_static_decode(model, model.config, min(lengths), rows, steps, 2, attn)
                                for rows in (1, 4)]
    return out


def run_summary(run: Path) -> dict[str, Any]:
    """The needle run's cells (timings, tokens, peak memory) and its measured-vs-projected table per length."""
    from evals.core.store import RunDir
    from evals.needle.report import needle_frame, projected_vs_measured

    run_dir = RunDir(run)
    meta, rows = run_dir.read_run(), list(run_dir.rows())
    keep = ("cell_id", "length", "depth", "kind", "found", "prompt_tokens", "computed_tokens", "reused_tokens",
            "seconds", "decode_seconds", "answer_tokens", "gpu_peak_bytes")
    projection = meta.get("projection")
    table = projected_vs_measured(needle_frame(rows, meta), projection) if projection else None
    return {"model": meta.get("model"), "settings": meta.get("settings"), "projection": projection,
            "cells": [{k: r.get(k) for k in keep} for r in rows],
            "measured_vs_projected": None if table is None else table.to_dict("records")}


def extrapolate(run: dict[str, Any], layers: dict[str, Any], ckpt: Path, full: str = FULL_MODEL,
                gpu: str = "h200") -> list[dict]:
    """The measured grid per length projected to the full model (issue 15): the run's cells' prefill and decode times
    scaled as the hooked calls scale to the full layer count (:func:`_layer_scale`); memory = the planner's full
    NF4 weights + its KV cache of the length, once shared and once per decode row
    (:func:`ragkit.projection.decode_rows`, on ``gpu``'s memory) + the measured activations (the run's peak less
    the loaded weights and the 4-layer KV caches)."""
    from ragkit.placement import load_config
    from ragkit.planner import plan
    from ragkit.projection import decode_rows, gpu_table

    small, full_plan = plan(load_config(ckpt)[0], quant="nf4"), plan(load_config(full)[0], quant="nf4")
    out = []
    for t in layers["by_length"]:
        cells = [c for c in run["cells"] if c["length"] == t["length"]]
        if not cells:
            continue
        decode_run = sum(c["decode_seconds"] for c in cells)
        p_scale = _layer_scale(t["prefill_s_per_layer"], t["prefill_s"], full_plan.kv.layers)
        d_scale = _layer_scale(t["decode_ms_per_layer"], t["decode_step_ms"], full_plan.kv.layers)
        prefill = (sum(c["seconds"] for c in cells) - decode_run) * p_scale
        decode = decode_run * d_scale
        entry = {"length": t["length"], "layers": full_plan.kv.layers, "prefill_s": prefill, "decode_s": decode,
                 "wall_s": prefill + decode, "scale_prefill": p_scale, "scale_decode": d_scale,
                 "layer_share_prefill": sum(t["prefill_s_per_layer"]) / t["prefill_s"],
                 "layer_share_decode": sum(t["decode_ms_per_layer"]) / t["decode_step_ms"]}
        peaks = [c["gpu_peak_bytes"] for c in cells if c.get("gpu_peak_bytes")]
        if layers.get("weights_bytes") and peaks:  # on CUDA
            batch = (run.get("settings") or {}).get("batch_size") or 8  # the runner's default on CUDA
            row, full_row = small.kv.bytes_per_token * t["length"], full_plan.kv.bytes_per_token * t["length"]
            rows = decode_rows(len(cells), batch, 2**62, row)  # 4 layers: memory never limited the rows
            activations = max(peaks) - layers["weights_bytes"] - row * (1 + rows)
            full_rows = decode_rows(len(cells), batch, gpu_table()[gpu]["memory_bytes"] - full_plan.weights_bytes
                                    - full_row, full_row)
            entry.update(weights_bytes=full_plan.weights_bytes, activation_bytes=activations, decode_rows=full_rows,
                         kv_cache_bytes=full_row * (1 + full_rows),
                         peak_bytes=full_plan.weights_bytes + full_row * (1 + full_rows) + activations)
        out.append(entry)
    return out


def _layer_scale(per_layer: Sequence[float], total: float, layers: int) -> float:
    """How much longer a call takes with ``layers`` decoder layers than with the measured ones: each layer at the
    measured median, what a layer took beyond the median counted once (the first layer of a call pays cuDNN's
    plan for a new attention shape, which the later layers reuse), the rest of the call (embeddings, head) once."""
    typical = statistics.median(per_layer)
    once = sum(max(0.0, x - typical) for x in per_layer)
    return (total - sum(per_layer) + typical * layers + once) / total


def provenance() -> dict[str, Any]:
    import torch
    import transformers

    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: Sequence[str] | None = None) -> int:
    from ragkit.projection import parse_tokens

    p = argparse.ArgumentParser(prog="python -m benchmarks.mistral4_needle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    sub.add_parser("tokenizer").add_argument("directory", type=Path)
    w = sub.add_parser("write")
    w.add_argument("ckpt", type=Path)
    w.add_argument("--tokenizer", type=Path, help="a folder the tokenizer step wrote (default: write it here)")
    w.add_argument("--layers", type=int, default=4)
    w.add_argument("--tiny", action="store_true", help="toy width (CPU tests)")
    lt = sub.add_parser("layers")
    lt.add_argument("ckpt", type=Path)
    lt.add_argument("--run", type=Path, help="the evals.needle run directory of CKPT to summarize")
    lt.add_argument("--plan", type=Path, help="the text `python -m evals.needle ... --plan` printed")
    lt.add_argument("--lengths", default="32k,128k,256k")
    lt.add_argument("--chunk", type=int, help="prefill tokens per forward call (default: the runner's)")
    lt.add_argument("--steps", type=int, default=16)
    lt.add_argument("--device", default=None)
    lt.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.step == "tokenizer":
        write_tokenizer(args.directory)
    elif args.step == "write":
        write(args.ckpt, args.tokenizer, args.layers, args.tiny)
    else:
        lengths = [parse_tokens(x) for x in args.lengths.split(",")]
        result: dict[str, Any] = {"provenance": provenance(), "checkpoint": str(args.ckpt),
                                  "plan": args.plan.read_text(encoding="utf-8") if args.plan else None,
                                  "needle_run": run_summary(args.run) if args.run else None}
        result["layer_times"] = layer_times(args.ckpt, lengths, args.chunk, args.steps, args.device)
        if result["needle_run"]:
            result["full_model"] = extrapolate(result["needle_run"], result["layer_times"], args.ckpt)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
