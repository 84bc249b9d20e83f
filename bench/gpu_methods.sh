#!/usr/bin/env bash
# ALLoRA, LoRAPrune (training, pruned export, inference speed) and the HF Trainer reference
# on one GPU, at Llama-3-8B layer widths (4 layers). Target: under 6 minutes on one H100.
#   bash bench/gpu_methods.sh          (a GPU machine with the project installed)
# Results: bench/results/gpu_methods.json (or $OUT/gpu_methods.json when OUT is set).
# Without network, see bench/gpu_smoke.sh (the same .whl/ wheels): with the device tool,
# run(command="bash bench/gpu_methods.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" bench/gpu_methods.py --out "${OUT:-bench/results}" "$@"
