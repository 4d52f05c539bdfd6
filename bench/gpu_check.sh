#!/usr/bin/env bash
# The prepared GPU check: one H200, under 8 minutes, offline; JSON on stdout (see bench/gpu_check.py).
# Needs a python3 with torch, transformers and safetensors; nothing else, no network.
#   bash bench/gpu_check.sh [--out FILE]     # on the GPU machine
#   bash bench/gpu_check.sh --tiny           # CPU smoke run on a tiny model (here: .venv's python)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec timeout 480 "$PYTHON" bench/gpu_check.py "$@"
