"""GPU engine at long context: prefill on a cached prefix vs fresh, decode steps, runner vs naive loop, and the
real-width Mistral-4 (MLA) chunked prefill and absorbed decode. Random bf16 weights (no real weights reach the GPU
machine); every timing a median of ``--repeats`` after a warm-up, CUDA-synchronized.

    python -m benchmarks.gpu_engine dense --out results.json      # 7B-dense Llama shape
    python -m benchmarks.gpu_engine mla --out results.json        # Mistral-Small-4 width, --layers layers
    python -m benchmarks.gpu_engine kernels --out results.json    # the attention kernels alone
    python -m benchmarks.gpu_engine moe --out results.json        # one Mistral-4 MoE layer: NF4 prefill vs BF16

dense: per-token prefill time of a fresh prompt, of a tail on a cached prefix under transformers' ``sdpa`` (an
explicit query x key mask) and under ragkit's mask-free path (``ragkit.attention``); decode step ms at batch 1 on
a DynamicCache (both paths) and with a StaticCache + ``torch.compile(mode="reduce-overhead")`` (CUDA graphs);
and a needle-shaped grid at ``--length`` (random-token haystack, a 24-token needle at 5 depths x 2 seeds, plus a
control) decoded by evals.decode's runner vs one ``generate()`` per cell (answers compared).
kernels: the attention of a query block on a cached prefix alone (lower-right flash vs two cuDNN calls merged).
moe: one real-width Mistral-4 MoE layer's prefill at ``--tokens``: BF16 grouped_mm vs ragkit's NF4 with experts
dequantized by bitsandbytes or by ragkit's Triton kernel (several group sizes), and the dequantization alone.
mla: fresh prefill, prefill of the second half on a cached first half, and chunked prefill, at each
``--lengths`` (time, peak GiB), and the decode step at that cache with HF's expand-the-cache MLA vs absorbed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import DynamicCache

from ragkit import attention, graph_decode

DENSE = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=14336, vocab_size=49152, max_position_embeddings=262144, rope_theta=1e6)
DEVICE = "cuda"
GRIDS = ((32768, (0, 25, 50, 75, 100), (1, 2)), (131072, (0, 50, 100), (1,)))  # decode: the two grids
BF16_TFLOPS, HBM_TBS = 790e12, 4.3e12  # measured ceilings of this workplace's H200 (KINDS.md)


def timed(fn: Callable[[], Any], repeats: int, warm_up: Callable[[], Any] | None = None) -> tuple[Any, list[float]]:
    """``warm_up`` (default: ``fn``) once, then ``repeats`` CUDA-synchronized timings of ``fn`` (seconds)."""
    (warm_up or fn)()
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, times


def med(times: list[float]) -> float:
    return statistics.median(times)


def _forward(model, ids: torch.Tensor, cache) -> torch.Tensor:
    return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits


def _prefill_cases(model, cfg, res: dict, cases: list[tuple[int, int]], repeats: int, warm: bool = True):
    """(cached, new) cases: the time of feeding ``new`` tokens on a cache of ``cached`` (0: fresh), per mode;
    the prefix is prefilled again (untimed) before each timed tail."""
    for mode in ("sdpa", attention.NAME):
        model.set_attn_implementation(attention.register() if mode != "sdpa" else "sdpa")
        for cached, new in cases:
            row: dict[str, Any] = {"mode": mode, "cached": cached, "new": new}
            try:
                ids = torch.randint(3, cfg.vocab_size, (1, cached + new), device=DEVICE)
                times, peaks = [], []
                for r in range(repeats + int(warm)):
                    cache = DynamicCache(config=cfg)
                    if cached:
                        _forward(model, ids[:, :cached], cache)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    t = time.perf_counter()
                    _forward(model, ids[:, cached:], cache)
                    torch.cuda.synchronize()
                    if r >= int(warm):
                        times.append(time.perf_counter() - t)
                        peaks.append((torch.cuda.max_memory_allocated() - base) / 2**30)
                    del cache
                    torch.cuda.empty_cache()
                row.update(times_s=times, median_s=med(times), per_token_us=med(times) / new * 1e6,
                           transient_peak_gib=max(peaks))
                del ids
            except torch.OutOfMemoryError as e:
                row["oom"] = str(e)[:200]
            torch.cuda.empty_cache()
            res.setdefault("prefill", []).append(row)
            print("prefill", json.dumps(row), flush=True)


def _decode_steps(model, cfg, res: dict, cache_len: int, steps: int = 32):
    """Decode step ms at batch 1 on a ``cache_len`` DynamicCache (both attention paths), and compiled+static."""
    ids = torch.randint(3, cfg.vocab_size, (1, cache_len), device=DEVICE)
    tok = torch.randint(3, cfg.vocab_size, (1, 1), device=DEVICE)
    for mode in ("sdpa", attention.NAME):
        model.set_attn_implementation(attention.register() if mode != "sdpa" else "sdpa")
        cache = DynamicCache(config=cfg)
        _forward(model, ids, cache)
        for _ in range(3):
            _forward(model, tok, cache)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            _forward(model, tok, cache)
        torch.cuda.synchronize()
        res[f"decode_ms_{mode}"] = (time.perf_counter() - t) / steps * 1000
        print("decode", mode, res[f"decode_ms_{mode}"], flush=True)
        del cache
        torch.cuda.empty_cache()
    model.set_attn_implementation("sdpa")
    try:
        from transformers import StaticCache

        sc = StaticCache(config=cfg, max_cache_len=cache_len + 64)
        model(input_ids=ids, cache=sc, use_cache=True, logits_to_keep=1,
              cache_position=torch.arange(cache_len, device=DEVICE))
        step = torch.compile(lambda t, pos: model(input_ids=t, cache=sc, use_cache=True, logits_to_keep=1,
                                                  cache_position=pos).logits, mode="reduce-overhead")
        t0 = time.perf_counter()
        for i in range(4):
            step(tok, torch.tensor([cache_len + i], device=DEVICE))
        torch.cuda.synchronize()
        res["compile_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        for i in range(4, 4 + steps):
            step(tok, torch.tensor([cache_len + i], device=DEVICE))
        torch.cuda.synchronize()
        res["decode_ms_static_compiled"] = (time.perf_counter() - t) / steps * 1000
        del sc
    except Exception as e:  # noqa: BLE001 - a failed compile is a result, not a crash
        res["static_compiled_error"] = repr(e)[:300]
    print("decode static+compiled", res.get("decode_ms_static_compiled"), res.get("static_compiled_error"), flush=True)
    torch.cuda.empty_cache()


def _grid(cfg, length: int, max_new: int, depths=(0, 25, 50, 75, 100), seeds=(1, 2)) -> tuple[list[list[int]], list[int]]:
    """Needle-shaped prompts: one random haystack, a 24-token needle at ``depths`` for each seed, and the control."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(3, cfg.vocab_size, (length - max_new,), generator=gen).tolist()
    prompts = []
    for seed in seeds:
        needle = torch.randint(3, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(seed)).tolist()
        for depth in depths:
            cut = round((len(base) - 64) * depth / 100)
            prompts.append(base[:cut] + needle + base[cut:len(base) - 24])
    return prompts + [base], base


def _runner_vs_naive(model, cfg, res: dict, length: int, max_new: int, repeats: int, naive_repeats: int = 1,
                     variants=(("runner_bs8", 8, True), ("runner_bs8_sdpa_mask", 8, False), ("runner_bs1", 1, True)),
                     **grid):
    prompts, base = _grid(cfg, length, max_new, **grid)
    eos = [10**9]  # random weights: every cell decodes its whole budget

    def naive():
        model.set_attn_implementation("sdpa")
        out = []
        with torch.inference_mode():
            for p in prompts:
                x = torch.tensor([p], device=DEVICE)
                out.append(model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                          do_sample=False, pad_token_id=0)[0, len(p):].tolist())
        return out

    stretches: list[tuple[int, int]] = []  # (cached, fed) of each prefill call of the last runner run

    def runner(batch: int, lower_right: bool, n: int = len(prompts)):
        def go():
            model.set_attn_implementation("sdpa")
            decoder = GreedyDecoder(model, eos, max_new, batch_size=batch)  # on CUDA: switches to ragkit's path
            if not lower_right:
                model.set_attn_implementation("sdpa")
            plain = decoder._forward
            stretches.clear()

            def counted(ids, cache):  # bs 8: every call is a prefill stretch (decode steps run on the static cache)
                stretches.append((cache.get_seq_length(), len(ids)))
                return plain(ids, cache)

            decoder._forward = counted
            rows = list(decoder.run_group(prompts[:n], base))
            return {d.index: d for d in rows}
        return go

    from evals.core.decode import GreedyDecoder

    row: dict[str, Any] = {"length": length, "cells": len(prompts), "max_new_tokens": max_new}
    torch.cuda.reset_peak_memory_stats()
    want, t = timed(naive, naive_repeats, warm_up=lambda: model.generate(torch.tensor([prompts[0][:4096]], device=DEVICE),
                                                               max_new_tokens=4, do_sample=False, pad_token_id=0))
    row.update(naive_s=t, naive_median_s=med(t), naive_peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               naive_floor_s=floor_s(cfg, [(0, len(p)) for p in prompts], len(prompts) * (max_new - 1)))
    print("naive", t, flush=True)
    for name, batch, lr in variants:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        got, t = timed(runner(batch, lr), repeats, warm_up=runner(batch, lr, 2 if length <= 32768 else 1))
        row[name] = {"times_s": t, "median_s": med(t), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                     "speedup_vs_naive": row["naive_median_s"] / med(t),
                     "same_answers": sum(got[i].new_ids == want[i] for i in range(len(prompts))),
                     "computed_tokens": sum(d.computed_tokens for d in got.values()),
                     "tokens_fed": sum(n for _, n in stretches), "stretches": list(stretches),
                     "prompt_tokens": sum(len(p) for p in prompts)}
        steps = -(-len(prompts) // batch) * (max_new - 1)  # random weights: every row decodes its whole budget
        row[name].update(floor_s=floor_s(cfg, stretches, steps), decode_steps=steps)
        row[name]["wall_over_floor"] = row[name]["median_s"] / row[name]["floor_s"]
        print(name, json.dumps(row[name]), flush=True)
    res.setdefault("runner_vs_naive", []).append(row)
    model.set_attn_implementation("sdpa")


def floor_s(cfg, stretches: list[tuple[int, int]], decode_steps: int) -> float:
    """Prefill-FLOP floor plus decode-bandwidth floor (seconds): for each stretch of ``n`` tokens fed on a cache of
    ``c``, (2 x non-embedding params x n + 4 x n x (c + n/2) x hidden x layers) / 790 TFLOP/s; plus ``decode_steps``
    x weight bytes / 4.3 TB/s."""
    h, L, inter, kv = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_key_value_heads
    head = h // cfg.num_attention_heads
    non_emb = L * (2 * h * h + 2 * h * kv * head + 3 * h * inter + 2 * h) + h
    flops = sum(2 * non_emb * n + 4 * n * (c + n / 2) * h * L for c, n in stretches)
    weight_bytes = 2 * (non_emb + 2 * cfg.vocab_size * h)
    return flops / BF16_TFLOPS + decode_steps * weight_bytes / HBM_TBS


def _kv_rows(model, cfg, n: int, rows: int, room: int):
    """Static-cache buffers holding ``rows`` copies of one random ``n``-token prompt's KV, ``room`` free slots
    after it, and the prompt's greedy first token."""
    ids = torch.randint(3, cfg.get_text_config().vocab_size, (1, n), device=DEVICE)
    cache = DynamicCache(config=cfg)
    first = int(_forward(model, ids, cache)[0, -1].argmax())
    keys, values = graph_decode.buffers_like(cache, rows, graph_decode.static_slots(n + room))
    for k, v, layer in zip(keys, values, cache.layers):
        k[:, :, :n], v[:, :, :n] = layer.keys, layer.values
    return keys, values, first


def _static_decode(model, cfg, n: int, rows: int, steps: int, repeats: int, attn: str) -> dict[str, Any]:
    """Tokens/s of ``steps`` StaticDecode steps (CUDA graph) of ``rows`` rows on an ``n``-token cache, under
    attention implementation ``attn``; the first step (eager, then the capture) timed apart."""
    model.set_attn_implementation(attn)
    times, first_s, captured = [], [], []
    for r in range(repeats + 1):
        keys, values, first = _kv_rows(model, cfg, n, rows, steps + 2)
        dec = graph_decode.StaticDecode(model, keys, values, [n] * rows, n, [first] * rows)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        it = dec.steps(steps + 1)
        next(it)  # step 0 (eager + capture) is done, step 1 launched
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in it:
            pass
        torch.cuda.synchronize()
        if r:
            times.append(time.perf_counter() - t1)
            first_s.append(t1 - t0)
        captured.append(dec.captured)
        del dec, keys, values
        torch.cuda.empty_cache()
    ms = med(times) / steps * 1000
    row = {"cache": n, "rows": rows, "attention": attn, "steps": steps, "times_s": times, "ms_per_step": ms,
           "tok_per_s": rows * 1000 / ms, "first_step_s": first_s, "captured": all(captured)}
    print("static", json.dumps(row), flush=True)
    return row


def decode(args, res: dict, save: Callable[[], None]) -> None:
    """Decode at batch 1 and 8: generate() (DynamicCache, step by step) vs ragkit.graph_decode (static cache, CUDA
    graph), tokens/s, and whether the greedy tokens agree."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**DENSE)
    model = _random_bf16(LlamaForCausalLM, cfg)
    params = sum(p.numel() for p in model.parameters())
    res.update(model="random Llama, 7B-dense shape", config=DENSE, params=params,
               weights_gib=torch.cuda.memory_allocated() / 2**30, decode_floor_ms=params * 2 / HBM_TBS * 1000,
               floor_tok_per_s=HBM_TBS / (params * 2))
    save()
    eos = [10**9]
    with torch.inference_mode():
        for n in (46, 8192):  # LocalLLM.complete-shaped: a prompt of n tokens, 128 new, end to end
            ids = torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            x = torch.tensor([ids], device=DEVICE)
            row: dict[str, Any] = {"prompt": n, "new": 128}
            model.set_attn_implementation("sdpa")
            want, t = timed(lambda: model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=128,
                                                   do_sample=False, pad_token_id=0)[0, n:].tolist(), args.repeats)
            row.update(generate_s=t, generate_tok_per_s=128 / med(t))
            attention.use_lower_right(model)
            model._ragkit_decode = None  # the first call of a bucket builds its static cache and captures
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            graph_decode.greedy(model, ids, 128, eos)
            torch.cuda.synchronize()
            row["graph_first_call_s"] = time.perf_counter() - t0
            got, t = timed(lambda: graph_decode.greedy(model, ids, 128, eos), args.repeats)
            row.update(graph_s=t, graph_tok_per_s=128 / med(t), speedup=med(row["generate_s"]) / med(t),
                       same_tokens=got == want, common_prefix=next((i for i, (a, b) in enumerate(zip(got, want))
                                                                   if a != b), len(want)))
            res.setdefault("end_to_end", []).append(row)
            print("end_to_end", json.dumps(row), flush=True)
            save()
        if args.end_to_end_only:
            return
        for n, rows, attn in ((8192, 1, attention.NAME), (8192, 8, attention.NAME), (8192, 1, "sdpa"),
                              (8192, 8, "sdpa"), (32768, 1, attention.NAME), (32768, 8, attention.NAME)):
            try:
                res.setdefault("static", []).append(_static_decode(model, cfg, n, rows, 128, args.repeats, attn))
            except Exception as e:  # noqa: BLE001 - recorded, the next case still runs
                res.setdefault("static", []).append({"cache": n, "rows": rows, "attention": attn,
                                                     "error": repr(e)[:300]})
            save()
        model.set_attn_implementation("sdpa")
        if args.length:
            for length, depths, seeds in GRIDS:
                if length <= args.length:
                    _runner_vs_naive(model, cfg, res, length, args.max_new, args.repeats,
                                     variants=(("runner_bs8", 8, True),), depths=depths, seeds=seeds)
                    save()


def _timed_stretches(decoder, log: list[tuple[int, int, float]]) -> None:
    """Record (cached, fed, seconds) of every prefill call of ``decoder`` (CUDA-synchronized)."""
    plain = decoder._forward

    def timed_call(ids, cache):
        torch.cuda.synchronize()
        t, c = time.perf_counter(), cache.get_seq_length()
        out = plain(ids, cache)
        torch.cuda.synchronize()
        log.append((c, len(ids), time.perf_counter() - t))
        return out

    decoder._forward = timed_call


MOE_TOKENS = (2048, 16384, 65536)
MOE_GROUPS = (16, 32, 64)  # Triton path; 128 at once would make one 2^31-element weight tensor for grouped_mm
KERNEL_LAUNCHES = ((64, 4), (128, 4), (256, 8))  # (64-value blocks per program, warps) of the Triton kernel


def _moe_layer():
    """One real-width Mistral-4 MoE layer in BF16 (random, std 0.02, seed 0) and its ragkit-NF4 twin."""
    import benchmarks.moe_nf4_gpu as moe

    torch.manual_seed(0)
    config = moe.text_config(1)
    with torch.device(DEVICE):
        bf16 = moe.Mistral4MoE(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in bf16.parameters():
            p.normal_(0.0, 0.02)
    nf4 = moe.nf4_layer(bf16, config)
    config._experts_implementation = "grouped_mm"
    return bf16, nf4


def _moe_dequantize(experts, res: dict) -> None:
    """All experts of both projections dequantized alone, a group at a time: bitsandbytes (group 16, the old path)
    vs the Triton kernel at each of MOE_GROUPS and KERNEL_LAUNCHES, ms and effective GB/s (codes, absmax and
    output bytes moved); and how many values of the first 4 experts the kernel writes unlike bitsandbytes (0: bit for
    bit)."""
    from ragkit.quant.nf4_triton import dequantize_nf4_experts

    import benchmarks.moe_nf4_gpu as moe

    ids = torch.arange(experts.num_experts, device=DEVICE)
    moved = sum(experts.num_experts * (getattr(experts, f"{p}_codes").shape[1] + getattr(experts, f"{p}_absmax").shape[1]
                                       + 4 * getattr(experts, f"{p}_absmax2").shape[1] + 4 + 2 * r * c)
                for p, (r, c) in experts.shapes.items())  # bytes read (codes, absmax, scales) + written (bf16)
    mismatches = {}
    for p in experts.shapes:
        experts.use_triton = False
        want = experts.dequantize_experts(p, ids[:4])
        experts.use_triton = True
        mismatches[p] = int((experts.dequantize_experts(p, ids[:4]) != want).sum())  # values that differ: 0 wanted
    res["moe_triton_mismatches_vs_bnb"] = mismatches
    print("moe_triton_mismatches_vs_bnb", mismatches, flush=True)
    runs = [("bnb", experts.group_size, None)] + [("triton", g, KERNEL_LAUNCHES[0]) for g in MOE_GROUPS]
    runs += [("triton", MOE_GROUPS[0], launch) for launch in KERNEL_LAUNCHES[1:]]
    for path, group, launch in runs:
        row: dict[str, Any] = {"path": path, "group": group, "blocks_per_program": launch and launch[0],
                               "num_warps": launch and launch[1]}
        outs = {p: torch.empty(group, r, c, dtype=experts.compute_dtype, device=DEVICE)
                for p, (r, c) in experts.shapes.items()}

        experts.use_triton = path == "triton"

        def run():
            for g in range(0, experts.num_experts, group):
                for p in experts.shapes:
                    if launch is None:
                        experts.dequantize_experts(p, ids[g:g + group])
                        continue
                    buffers = [getattr(experts, f"{p}_{part}") for part in ("codes", "absmax", "absmax2", "offset")]
                    dequantize_nf4_experts(*buffers, experts.nf4_code, experts.nested_code, ids[g:g + group],
                                           outs[p][:len(ids[g:g + group])], *launch)

        row["ms"] = moe.median_ms(run, 2, 5)
        row["GBps"] = moved / row["ms"] / 1e6
        experts.use_triton = True
        res.setdefault("moe_dequantize", []).append(row)
        print("moe_dequantize", json.dumps(row), flush=True)
        del outs
        torch.cuda.empty_cache()
    res["moe_dequantize_bytes_moved"] = moved


def _moe_prefill(res: dict, tokens: tuple[int, ...]) -> None:
    """One real-width Mistral-4 MoE layer: BF16 grouped_mm vs ragkit's NF4 prefill at each token count, experts
    dequantized by bitsandbytes in groups of 16 (the old path) or by ragkit's Triton kernel in each of MOE_GROUPS;
    time, ratio to BF16, extra GiB over the weights, and the relative difference to the bitsandbytes path; before
    them the dequantization alone, after them the GPU time per kernel of both layers at the prefill chunk
    (``moe_profile``). Medians of 5 after 2 warm-ups; a token count that runs out of memory is recorded."""
    import benchmarks.moe_nf4_gpu as moe
    from ragkit.quant import measure_footprint

    bf16, nf4 = _moe_layer()
    experts = nf4.experts
    default = experts.group_size
    res.update(moe_bf16_gib=measure_footprint(bf16).nbytes / 2**30, moe_nf4_gib=measure_footprint(nf4).nbytes / 2**30)
    with torch.no_grad():
        _moe_dequantize(experts, res)
        for n in tokens:
            row: dict[str, Any] = {"tokens": n}
            try:
                x = torch.randn(1, n, bf16.experts.gate_up_proj.shape[-1], device=DEVICE, dtype=torch.bfloat16)
                row["bf16_grouped_mm_ms"] = moe.median_ms(lambda: bf16(x), 2, 5)
                want = None
                for path, group in [("bnb", default)] + [("triton", g) for g in MOE_GROUPS]:
                    experts.use_triton, experts.group_size = path == "triton", group
                    key = f"nf4_{path}_group{group}"
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    row[f"{key}_ms"] = moe.median_ms(lambda: nf4(x), 2, 5)
                    row[f"{key}_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                    row[f"{key}_over_bf16"] = row[f"{key}_ms"] / row["bf16_grouped_mm_ms"]
                    out = nf4(x).float()
                    if want is None:
                        want = out
                    else:
                        row[f"{key}_rel_diff_vs_bnb"] = float((out - want).norm() / want.norm())
                    del out
            except torch.OutOfMemoryError as e:
                row["oom"] = str(e)[:200]
            finally:
                experts.use_triton, experts.group_size = True, default
                x = want = out = None
                torch.cuda.empty_cache()
            res.setdefault("moe_prefill", []).append(row)
            print("moe_prefill", json.dumps(row), flush=True)
        hidden = bf16.experts.gate_up_proj.shape[-1]
        x = torch.randn(1, MOE_PROFILE_TOKENS, hidden, device=DEVICE, dtype=torch.bfloat16)
        res["moe_profile"] = {name: _kernel_times(layer, x) for name, layer in (("bf16_grouped_mm", bf16), ("nf4", nf4))}
    del bf16, nf4
    torch.cuda.empty_cache()


MOE_PROFILE_TOKENS = 16384  # the prefill chunk


def _kernel_times(layer, x: torch.Tensor, calls: int = 3) -> list[dict[str, Any]]:
    """GPU time per kernel name over ``calls`` forwards of ``layer`` (after one warm-up), ms per forward, largest
    first: where a layer's prefill time goes."""
    from torch.profiler import ProfilerActivity, profile

    layer(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            layer(x)
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:120], "ms": e.self_device_time_total / 1e3 / calls, "launches": e.count // calls}
            for e in prof.key_averages() if e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r["ms"])[:20]


def moe_only(args, res: dict, save: Callable[[], None]) -> None:
    """The NF4 MoE prefill comparison alone (:func:`_moe_prefill`) at ``--tokens``."""
    import bitsandbytes
    import triton

    res.update(triton=triton.__version__, bitsandbytes=bitsandbytes.__version__)
    _moe_prefill(res, tuple(args.tokens))


def nf4(args, res: dict, save: Callable[[], None]) -> None:
    """Real-width Mistral-4 with ``--layers`` MoE layers (+ the Pixtral tower), written as a random FP8 checkpoint
    and loaded as NF4 by ragkit's loader; the MoE layer's NF4 prefill vs BF16; then needle-shaped grids (random
    tokens, depths 0/50/100 + control, one seed) at each ``--lengths`` through the runner (batch 8, prefill in
    ``--chunk``-token chunks): wall per cell, tokens fed, peak memory, prefill and decode time per layer."""
    from evals.core.decode import GreedyDecoder
    import benchmarks.moe_nf4_gpu as moe
    from ragkit.quant import load_nf4

    _moe_prefill(res, (2048, 16384))
    save()
    ckpt = Path(args.ckpt)
    t = time.perf_counter()
    moe.write_checkpoint(ckpt, args.layers)
    res["write_checkpoint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = load_nf4(ckpt, device=DEVICE, progress=False)
    torch.cuda.synchronize()
    cfg = model.config.get_text_config()
    res.update(load_s=time.perf_counter() - t, layers=args.layers, weights_gib=torch.cuda.memory_allocated() / 2**30,
               model=f"Mistral3ForConditionalGeneration, Mistral-4 text at real width, {args.layers} MoE layers, NF4")
    save()
    eos = [10**9]
    with torch.inference_mode():
        for T in [4096] + list(args.lengths):  # 4096: warm-up, not reported
            prompts, base = _grid(cfg, T, args.max_new, depths=(0, 50, 100), seeds=(1,))
            decoder = GreedyDecoder(model, eos, args.max_new, batch_size=8, prefill_chunk=args.chunk)
            log: list[tuple[int, int, float]] = []
            _timed_stretches(decoder, log)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                rows = sorted(decoder.run_group(prompts, base), key=lambda d: d.index)
            except torch.OutOfMemoryError as e:
                res.setdefault("grid", []).append({"length": T, "oom": str(e)[:300]})
                save()
                continue
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
            if T == 4096:
                continue
            prefill = sum(s for _, _, s in log)
            steps = -(-len(prompts) // 8) * (args.max_new - 1)
            row = {"length": T, "cells": len(prompts), "wall_s": wall, "prefill_s": prefill, "decode_s": wall - prefill,
                   "decode_steps": steps, "decode_ms_per_step": (wall - prefill) / steps * 1000,
                   "prefill_s_per_layer": prefill / args.layers,
                   "decode_ms_per_step_per_layer": (wall - prefill) / steps * 1000 / args.layers,
                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "tokens_fed": sum(n for _, n, _ in log), "computed_tokens": sum(d.computed_tokens for d in rows),
                   "prompt_tokens": sum(len(p) for p in prompts),
                   "cells_s": [d.seconds for d in rows], "cells_computed": [d.computed_tokens for d in rows],
                   "cells_reused": [d.reused_tokens for d in rows], "stretches": log}
            res.setdefault("grid", []).append(row)
            print("grid", json.dumps({k: v for k, v in row.items() if k != "stretches"}), flush=True)
            save()
        keys, values, first = _kv_rows(model, cfg, 1024, 1, 8)
        dec = graph_decode.StaticDecode(model, keys, values, [1024], 1024, [first])
        list(dec.steps(4))
        res["static_decode_captured"] = dec.captured  # False: NF4 experts route tokens on the host


def _random_bf16(model_class, cfg):
    """``model_class(cfg)`` with random bf16 weights (seed 0) made on the device, on transformers' sdpa."""
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = model_class(cfg).eval()
    torch.set_default_dtype(torch.float32)
    return model


def dense(args, res: dict, save: Callable[[], None]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**DENSE)
    model = _random_bf16(LlamaForCausalLM, cfg)
    params = sum(p.numel() for p in model.parameters())
    non_emb = params - 2 * cfg.vocab_size * cfg.hidden_size
    res.update(model="random Llama, 7B-dense shape", config=DENSE, params=params, non_embedding_params=non_emb,
               weights_gib=torch.cuda.memory_allocated() / 2**30,
               decode_floor_ms=params * 2 / HBM_TBS * 1000)
    save()
    with torch.inference_mode():
        if args.prefill_only:  # the prefill cases alone (at --length, and --long if given)
            L = args.length
            _prefill_cases(model, cfg, res, [(0, L), (46, L - 46), (L // 2, L // 2)], args.repeats)
            if args.long:
                _prefill_cases(model, cfg, res, [(args.long // 2, args.long // 2)], 1, warm=False)
            return
        if args.grid_only:  # the runner vs naive at --length with --depths and --seeds, bs8 only
            _runner_vs_naive(model, cfg, res, args.length, args.max_new, args.repeats, args.naive_repeats,
                             variants=(("runner_bs8", 8, True),), depths=tuple(args.depths), seeds=tuple(args.seeds))
            return
        L = args.length
        _prefill_cases(model, cfg, res, [(0, L), (46, L - 46), (L // 2, L // 2)], args.repeats)
        save()
        _decode_steps(model, cfg, res, 8192)
        save()
        _runner_vs_naive(model, cfg, res, L, args.max_new, args.repeats)
        save()
        if args.long:
            _prefill_cases(model, cfg, res, [(0, args.long), (args.long // 2, args.long // 2)], 1, warm=False)
            save()


def mla(args, res: dict, save: Callable[[], None]) -> None:
    from transformers import Mistral4Config, Mistral4ForCausalLM

    cfg = Mistral4Config(num_hidden_layers=args.layers, first_k_dense_replace=0)
    model = _random_bf16(Mistral4ForCausalLM, cfg)
    res.update(model=f"random Mistral4ForCausalLM, real width, {args.layers} MoE layers",
               params=sum(p.numel() for p in model.parameters()), weights_gib=torch.cuda.memory_allocated() / 2**30)
    save()
    with torch.inference_mode():
        for T in args.lengths:
            for mode, chunk in (("sdpa", None), (attention.NAME, None), (attention.NAME, args.chunk)):
                row: dict[str, Any] = {"T": T, "mode": mode, "chunk": chunk}
                model.set_attn_implementation(attention.register() if mode != "sdpa" else "sdpa")
                try:
                    ids = torch.randint(3, cfg.vocab_size, (1, T), device=DEVICE)
                    for label, start in (("fresh", 0), ("second_half", T // 2)):
                        torch.cuda.empty_cache()
                        cache = DynamicCache(config=cfg)
                        if start:
                            _forward(model, ids[:, :start], cache)
                        torch.cuda.reset_peak_memory_stats()
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        step = chunk or T
                        for s in range(start, T, step):
                            _forward(model, ids[:, s:min(T, s + step)], cache)
                        torch.cuda.synchronize()
                        row[f"{label}_s"] = time.perf_counter() - t
                        row[f"{label}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    tok = torch.randint(3, cfg.vocab_size, (1, 1), device=DEVICE)
                    for absorbed in (False, True):
                        if absorbed:
                            attention.use_lower_right(model)  # absorbs kv_b_proj for decode steps
                        _forward(model, tok, cache)
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        for _ in range(8):
                            _forward(model, tok, cache)
                        torch.cuda.synchronize()
                        row["decode_ms_absorbed" if absorbed else "decode_ms_expand"] = (time.perf_counter() - t) / 8e-3
                    _restore_expand(model)
                    del cache, ids
                except torch.OutOfMemoryError as e:
                    row["oom"] = str(e)[:200]
                    _restore_expand(model)
                torch.cuda.empty_cache()
                res.setdefault("runs", []).append(row)
                print("mla", json.dumps(row), flush=True)
                save()


def _restore_expand(model) -> None:
    """Back to transformers' own MLA (for the next case's baseline)."""
    for m in model.modules():
        if hasattr(m, "ragkit_expand_kv"):
            m.expand_kv = m.ragkit_expand_kv
            del m.ragkit_expand_kv


def kernels(args, res: dict, save: Callable[[], None]) -> None:
    """A query block on a cached prefix, 32 heads x 128, bf16: lower-right flash vs split cuDNN (+ LSE merge) vs a
    fresh causal pass over all rows; the relative error of each against a float32 lower-right reference."""
    for c, n in ((16384, 16384), (65536, 65536), (131072, 4096), (2048, 30720)):
        row: dict[str, Any] = {"cached": c, "new": n}
        q = torch.randn(1, 32, n, 128, device=DEVICE, dtype=torch.bfloat16)
        k = torch.randn(1, 32, c + n, 128, device=DEVICE, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ref = attention.lower_right_sdpa(q.float(), k.float(), v.float(), None) if c + n <= 40000 else None
        for name, fn in (("lower_right", attention.lower_right_sdpa), ("split_cudnn", attention.split_sdpa)):
            try:
                out, t = timed(lambda: fn(q, k, v, None), args.repeats)
                row[f"{name}_s"] = t
                if ref is not None:
                    row[f"{name}_rel_err"] = float((out.float() - ref).norm() / ref.norm())
            except RuntimeError as e:
                row[f"{name}_error"] = repr(e)[:300]
        qf = torch.randn(1, 32, c + n, 128, device=DEVICE, dtype=torch.bfloat16)
        _, row["fresh_causal_all_rows_s"] = timed(
            lambda: torch.nn.functional.scaled_dot_product_attention(qf, k, v, is_causal=True), args.repeats)
        res.setdefault("kernels", []).append(row)
        print("kernels", json.dumps(row), flush=True)
        save()
        del q, k, v, qf, ref
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("dense", "decode", "mla", "kernels", "nf4", "moe"))
    p.add_argument("--ckpt", default=str(Path(tempfile.gettempdir()) / "mistral4_fp8"),
                   help="nf4: where the random FP8 checkpoint is written")
    p.add_argument("--out", required=True)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--long", type=int, default=0, help="dense: also fresh vs half-on-cache prefill at this length")
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive-repeats", type=int, default=1, help="dense --grid-only: timed runs of the naive loop")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--grid-only", action="store_true", help="dense: only the runner vs naive grid")
    p.add_argument("--prefill-only", action="store_true", help="dense: only the prefill cases")
    p.add_argument("--end-to-end-only", action="store_true", help="decode: only generate() vs graph_decode.greedy")
    p.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0, 50, 100])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[131072, 262144])
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=list(MOE_TOKENS),
                   help="moe: token counts of the MoE-layer prefill")
    args = p.parse_args(argv)
    res: dict[str, Any] = {"what": args.what, "args": vars(args), "gpu": torch.cuda.get_device_name(),
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(res, indent=1))

    try:
        {"dense": dense, "decode": decode, "mla": mla, "kernels": kernels, "nf4": nf4,
         "moe": moe_only}[args.what](args, res, save)
    except Exception as e:  # noqa: BLE001 - what was measured before the failure is kept
        res["error"] = repr(e)[:500]
        save()
        raise
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
