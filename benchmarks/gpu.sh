#!/usr/bin/env bash
# One command for a GPU session (under 8 minutes on one H200-class GPU): TResNet-L at 448 against timm's
# tresnet_l, training with AMP fp16 and bf16, channels_last on and off, torch.compile on and off, inference,
# and peak training memory. Record the printed table in BENCHMARKS.md with the date and the GPU model.
#   bash benchmarks/gpu.sh             # on the GPU
#   bash benchmarks/gpu.sh --dry-run   # on a CPU: the same code paths, tiny sizes
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" benchmarks/bench_gpu.py "$@"
