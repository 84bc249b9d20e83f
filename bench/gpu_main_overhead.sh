#!/usr/bin/env bash
# Where does LoRA-drop's main stage lose time against plain LoRA on a GPU? (issue 9: the
# 70B-width smoke measured 0.61x, the 7B bench 0.93x at micro-batch 2 and 1.00x at 8.)
# A tiny model, one GPU, the real CLI and the default ZeRO-3 config, so that per-step host
# overhead dominates: plain LoRA; LoRA-drop keeping every layer (the rebuild, no sharing);
# keeping 2 of 4 layers (sharing); keeping 1. Prints the median main-stage s/step of each.
#   bash bench/gpu_main_overhead.sh          (device tool: carry .whl; about 2 minutes)
# Results: OUT/gpu_main_overhead.txt (OUT defaults to bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
W=${WORK:-/tmp/loradrop_overhead}; rm -rf "$W"; mkdir -p "$W"
mkdir -p "${OUT:-bench/results}"; RESULT=${OUT:-bench/results}/gpu_main_overhead.txt; : > "$RESULT"
"$PY" -c "import sys; sys.path.insert(0, 'tests'); from tiny import make_tiny_llama; from pathlib import Path; make_tiny_llama(Path('$W/model'))"
common="model.path=$W/model data.max_seq_len=64 train.micro_batch_size=2 train.max_steps=40 train.save_every=0 train.log_every=1 data.max_eval_examples=16 lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj] loradrop.sampling_steps=2 model.dtype=bfloat16"
for v in "plain loradrop.enabled=false" "keep_all loradrop.threshold=1.0" "keep2 loradrop.num_kept=2" "keep1 loradrop.num_kept=1" "plain_again loradrop.enabled=false"; do
  set -- $v; name=$1; shift
  "$PY" -m torch.distributed.run --nproc_per_node 1 --master_port 29633 launch/train.py $common output_dir=$W/$name "$@" > $W/$name.log 2>&1 || { echo "$name failed"; tail -5 $W/$name.log; }
  ("$PY" - "$W/$name" <<'PY'
import json, statistics, sys
rs = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
m = [r["seconds_per_step"] for r in rs if r.get("stage") == "main" and "seconds_per_step" in r][3:]
print(sys.argv[1].rsplit("/", 1)[1], "main-stage median s/step %.4f over %d steps" % (statistics.median(m), len(m)), flush=True)
PY
) | tee -a "$RESULT"
done
