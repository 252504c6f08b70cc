#!/usr/bin/env bash
# GPU benchmark (issue 6): training tokens/s and MFU (bf16 autocast) of GPT-2-small- and
# Qwen2-0.5B-shaped backbones with the Kindle-scale item table (349K x 128), sampled (8K
# negatives) and full chunked cross-entropy, and full-ranking evaluation of 100K users x 349K
# items. One NVIDIA GPU; about 5 minutes on an H100/H200 (plus interpreter start-up).
# Writes benchmarks/results/gpu.json. See benchmarks/gpu_bench.py for what is counted.
#
#   benchmarks/gpu.sh                   # on the GPU machine, from any directory
#   benchmarks/gpu.sh --shapes qwen2_0.5b --batch-sizes 256     # extra arguments go to gpu_bench.py
#   PYTHON=/path/to/python benchmarks/gpu.sh                    # a given interpreter
#
# Installs nothing. It needs a Python whose torch sees CUDA, with transformers, numpy, PyYAML
# and safetensors: the repository's .venv if its torch has CUDA (scripts/setup.sh pins the CPU
# build torch==2.13.0: do not run it on the GPU machine), else the system python3 (GPU images
# ship torch with CUDA). The package is imported from src/ (PYTHONPATH), so nothing is
# pip-installed, and polars (preprocessing only) is not needed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "error: nvidia-smi not found: this script needs an NVIDIA GPU (try: python benchmarks/gpu_bench.py --dry-run)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && has_cuda "$candidate"; then PY="$candidate"; break; fi
  done
fi
if [ -z "$PY" ] || ! has_cuda "$PY"; then
  echo "error: no Python with a CUDA build of torch found (set PYTHON=...)" >&2
  exit 2
fi
"$PY" -c 'import torch, transformers, numpy, yaml, safetensors; print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_bench.py "$@"
