#!/usr/bin/env bash
# Issue 15's proof on one GPU: real-width Mistral-Small-4 with 4 MoE layers (random FP8 weights), NF4 through
# ragkit's loader, the Tekken tokenizer, run as `python -m evals.needle` at 32k/128k/256k x depths 0/50/100 with
# controls, then per-layer prefill and decode times (benchmarks/mistral4_needle.py); everything lands in $OUT.
#
#   bash benchmarks/mistral4_needle.sh bundle     # here (CPU, the project venv), into .whl/m4: the Tekken tokenizer
#                                                 # (needs mistral-common) + the wheels a bare GPU host lacks
#   OUT=... bash benchmarks/mistral4_needle.sh run   # on the GPU host, with .whl/m4/ carried (29 MB)
#
# $OUT gets at most 7 files (the device returns 8): nvidia_smi.txt, write.log, plan.txt, needle.log, run.tgz (the
# evals.needle run directory), layers.log, mistral4_needle.json.
# `run` unpacks .whl/m4 into runs/m4_site (wheels are zips: no pip needed) and runs/m4_tokenizer, puts the site on
# PYTHONPATH, checks the imports, writes the ~15 GB checkpoint to $CKPT (not $OUT), then: --plan, the grid, the
# per-layer timings. Variables: PYTHON (python3), CKPT, LENGTHS (32k,128k,256k), BUNDLE (.whl/m4); a CPU dry run
# of the whole sequence: TINY=1 DEVICE=cpu LENGTHS=1k with a BUNDLE holding only m4_tokenizer.tgz.
set -euo pipefail
PY=${PYTHON:-python3}
BUNDLE=${BUNDLE:-.whl/m4}
LENGTHS=${LENGTHS:-32k,128k,256k}
# what `python -m evals.needle` imports beyond torch, transformers, bitsandbytes, pandas, tqdm, numpy,
# huggingface_hub, tokenizers, safetensors (LocalLLM is a LlamaIndex LLM, whose import needs PIL; rich draws the
# progress bars; the H200 image has no pydantic either, as a run there on 2026-12-02 found); the project venv's
# versions, as wheels for CPython 3.12 on x86-64 Linux
WHEELS=(llama-index-core==0.14.25 llama-index-instrumentation==0.6.0 llama-index-workflows==2.26.1 banks==2.5.1
        dataclasses-json==0.6.7 Deprecated==1.3.1 filetype==1.2.0 greenlet==3.5.6 griffecli==2.4.1 griffelib==2.4.1
        marshmallow==3.26.2 mypy_extensions==1.2.0 platformdirs==4.14.9 SQLAlchemy==2.0.58 tenacity==9.2.1
        tinytag==2.3.2 typing-inspect==0.9.0 wrapt==2.5.2 rich==15.0.0 Jinja2==3.1.6 MarkupSafe==3.0.4
        fsspec==2026.9.0 pillow==13.0.0 pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5
        annotated-types==0.8.0)

case "${1:-}" in
bundle)
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
    ${PYTHON:-python} -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$BUNDLE" "${WHEELS[@]}"
    tok=$(mktemp -d)
    ${PYTHON:-python} -m benchmarks.mistral4_needle tokenizer "$tok/m4_tokenizer"
    tar czf "$BUNDLE/m4_tokenizer.tgz" -C "$tok" m4_tokenizer && rm -rf "$tok"
    du -sh "$BUNDLE"
    ;;
run)
    : "${OUT:?set OUT to the folder the results go to}"
    CKPT=${CKPT:-${TMPDIR:-/tmp}/mistral4_fp8_4layers}
    SITE=runs/m4_site
    mkdir -p "$OUT" "$SITE"
    for w in "$BUNDLE"/*.whl; do [ -e "$w" ] && $PY -m zipfile -e "$w" "$SITE"; done
    tar xzf "$BUNDLE/m4_tokenizer.tgz" -C runs
    export PYTHONPATH="$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    $PY -c "import llama_index.core, rich, jinja2, bitsandbytes, transformers, torch; print('imports ok', torch.__version__, transformers.__version__, bitsandbytes.__version__)"
    $PY -c "import scipy" 2>/dev/null || echo "note: no scipy here; report.md (Wilson intervals) is written on the CPU side: python -m evals.needle --report RUN"
    (nvidia-smi || true) > "$OUT/nvidia_smi.txt" 2>&1
    start=$SECONDS
    DEVICE=${DEVICE:-cuda}
    GRID=(--model "$CKPT" --quant nf4 --dtype bfloat16 --device "$DEVICE" --lengths "$LENGTHS" --depths 0,50,100)
    $PY -m benchmarks.mistral4_needle write "$CKPT" --tokenizer runs/m4_tokenizer --layers 4 ${TINY:+--tiny} 2>&1 \
        | tee "$OUT/write.log"
    $PY -m evals.needle "${GRID[@]}" --plan ${TINY:+--gpu h200} 2>&1 | tee "$OUT/plan.txt"
    # the run's rows are stored as each cell ends; a failing report (no scipy) must not stop the timings below.
    # The run directory is packed into one file: the device returns at most 8 files from $OUT.
    RUN=runs/m4_run
    rm -rf "$RUN"
    $PY -m evals.needle "${GRID[@]}" --out "$RUN" 2>&1 | tee "$OUT/needle.log" || true
    echo "needle run done at $((SECONDS - start)) s" | tee -a "$OUT/needle.log"
    rm -rf "$RUN/tokens"  # the prompt token cache: rebuilt from the recipes, not a result
    tar czf "$OUT/run.tgz" -C runs m4_run
    $PY -m benchmarks.mistral4_needle layers "$CKPT" --run "$RUN" --plan "$OUT/plan.txt" --lengths "$LENGTHS" \
        --device "$DEVICE" --out "$OUT/mistral4_needle.json" 2>&1 | tee "$OUT/layers.log"
    echo "all done at $((SECONDS - start)) s" | tee -a "$OUT/layers.log"
    ;;
*)
    sed -n 2,12p "$0"
    exit 2
    ;;
esac
