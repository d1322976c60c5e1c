#!/usr/bin/env bash
# One command for a GPU session (sized for under 8 minutes on one H200-class GPU; --no-compile if short of time):
# TResNet-M 224 and TResNet-L 448, ours eager and compiled against timm's, training under AMP fp16 and bf16 with
# peak memory, inference, the memory-saving norm's GPU gradients against plain autograd's, and a 50-step train.py
# smoke run. Writes benchmarks/gpu_results/gpu.json and gpu.md; record the table in BENCHMARKS.md with the date.
#   bash benchmarks/gpu.sh             # on the GPU
#   bash benchmarks/gpu.sh --dry-run   # on a CPU: the same code paths, tiny sizes
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" benchmarks/bench_gpu.py "$@"
