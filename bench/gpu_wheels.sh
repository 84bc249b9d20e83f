#!/usr/bin/env bash
# Download the wheels that bench/gpu_smoke.sh needs on a GPU machine without network whose
# python3 (3.12) already has torch, transformers, peft, safetensors, sentencepiece, numpy,
# pyarrow, pyyaml, tqdm, psutil, msgpack, py-cpuinfo, ninja, einops, xxhash and fsspec (this
# workplace's lent GPU image; transformers, peft and regex are carried at the versions the
# project tests, since the image's are older). Run here, with network: bash bench/gpu_wheels.sh
# .whl/ is git-ignored; carry it to the machine with the working tree. liger-kernel (pure
# Python) is for bench/gpu_levers.sh's liger lever; its triton comes with the image's CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}  # needs torch to build DeepSpeed's wheel: the project's venv has it
mkdir -p .whl
# DeepSpeed ships an sdist only; built without ops (no isolation, so no CUDA torch is pulled
# in as a build dependency) it is a pure-Python wheel.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hjson pydantic pydantic-core annotated-types typing-inspection "datasets==5.2.0" dill multiprocess \
  "transformers==5.24.0" "peft==0.21.2" "regex>=2025.10.22" "liger-kernel==0.8.5"
ls .whl
