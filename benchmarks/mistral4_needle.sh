#!/usr/bin/env bash
# Issue 15's proof on one GPU: real-width Mistral-Small-4 with 4 MoE layers (random FP8 weights), NF4 through
# ragkit's loader, the Tekken tokenizer, run as `python -m evals.needle` at 32k/128k/256k x depths 0/50/100 with
# controls; then per-layer prefill and decode times; everything lands in $OUT (see benchmarks/mistral4_needle.py).
#
#   OUT=results/ TOKENIZER=runs/m4_tokenizer bash benchmarks/mistral4_needle.sh
#
# TOKENIZER: a folder `python -m benchmarks.mistral4_needle tokenizer DIR` wrote (it needs mistral-common, which a
# GPU machine may lack; the folder's files load without it). CKPT: where the ~15 GB checkpoint goes (not $OUT).
set -euo pipefail
: "${OUT:?set OUT to the folder the results go to}"
PY=${PYTHON:-python3}
TOKENIZER=${TOKENIZER:-runs/m4_tokenizer}
CKPT=${CKPT:-${TMPDIR:-/tmp}/mistral4_fp8_4layers}
LENGTHS=${LENGTHS:-32k,128k,256k}
GRID=(--model "$CKPT" --quant nf4 --dtype bfloat16 --device cuda --lengths "$LENGTHS" --depths 0,50,100)
mkdir -p "$OUT"
(nvidia-smi || true) > "$OUT/nvidia_smi.txt" 2>&1
start=$SECONDS
$PY -m benchmarks.mistral4_needle write "$CKPT" --tokenizer "$TOKENIZER" --layers 4 2>&1 | tee "$OUT/write.log"
$PY -m evals.needle "${GRID[@]}" --plan 2>&1 | tee "$OUT/plan.txt"
$PY -m evals.needle "${GRID[@]}" --out "$OUT/run" 2>&1 | tee "$OUT/needle.log"
echo "needle run done at $((SECONDS - start)) s" | tee -a "$OUT/needle.log"
rm -rf "$OUT/run/tokens"  # the prompt token cache: rebuilt from the recipes, not a result
$PY -m benchmarks.mistral4_needle layers "$CKPT" --run "$OUT/run" --plan "$OUT/plan.txt" --lengths "$LENGTHS" \
    --out "$OUT/mistral4_needle.json" 2>&1 | tee "$OUT/layers.log"
echo "all done at $((SECONDS - start)) s" | tee -a "$OUT/layers.log"
