#!/usr/bin/env bash
# GPU smoke test: the whole CLI at Llama-3-70B layer widths (4 layers) on one GPU, bf16,
# activation checkpointing, sequences of 2048, SIGKILL and resume, the adapter reloaded
# in plain peft, LoRA-drop's main stage against plain LoRA (step time, peak memory), and
# the fp16 / fp32+flash-attn refusals. Target: under 8 minutes on one H100.
#   bash bench/gpu_smoke.sh                 (a GPU machine with the project installed)
# Results: bench/results/gpu_smoke.json (or $OUT/gpu_smoke.json when OUT is set).
#
# On a machine without network whose python3 has torch + transformers + peft but not
# deepspeed/datasets (this workplace's lent GPU machines): run `bash bench/gpu_wheels.sh`
# on a networked machine first; it fills .whl/ (git-ignored, 6 MB), which this script
# installs from (bench/gpu_env.sh). With the device tool: run(command="bash bench/gpu_smoke.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" bench/gpu_smoke.py --out "${OUT:-bench/results}" "$@"
