#!/usr/bin/env bash
# The throughput levers of issue 18 in one call (bench/gpu_levers.py): today's baseline
# (micro-batch 8 with recomputation), each lever alone (no recomputation at the largest
# micro-batch that fits, memory_efficient_linear off, bf16 adapters, liger, TF32), the best
# combination, and LoRA-drop's main stage with it, on a 7B-shaped model with 2048-token rows.
# Target: under 7 minutes on one H200.
#   bash bench/gpu_levers.sh                (a GPU machine with the project installed)
#   bash bench/gpu_levers.sh --tiny         (any machine: the same flow on a tiny model)
# Results: bench/results/gpu_levers.json (or $OUT/gpu_levers.json when OUT is set) and a
# markdown table on stdout for docs/BENCHMARKS.md.
# On this workplace's lent GPU machines (no network): bash bench/gpu_wheels.sh here first, then
#   run(command="bash bench/gpu_levers.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" bench/gpu_levers.py --out "${OUT:-bench/results}" "$@"
