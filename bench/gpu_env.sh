# Sourced by the GPU scripts: picks the Python and, on a machine without network whose
# python3 has torch but not this project's tested deepspeed/datasets/transformers/peft (this
# workplace's lent GPU machines), installs the wheels that bench/gpu_wheels.sh put in .whl/
# into /tmp/loradrop_site and puts that first on PYTHONPATH. The machine's own torch stays:
# a CUDA torch is far larger than what can be carried there.
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if [ -d .whl ] && [ ! -d /tmp/loradrop_site ] && ! "$PY" -c "import deepspeed, datasets" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/loradrop_site .whl/*.whl
fi
[ -d /tmp/loradrop_site ] && export PYTHONPATH=/tmp/loradrop_site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import torch, deepspeed, transformers, peft, datasets; print('versions: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__)"
