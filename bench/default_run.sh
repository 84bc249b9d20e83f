#!/usr/bin/env bash
# Measure the embedded default (LoRA-drop) and the plain-LoRA baseline on this machine:
# wall time, peak RSS per rank, accuracy before/after, kept layers, trainable parameters.
#   bash bench/default_run.sh            (after bash scripts/setup.sh)
# Results go to bench/out/<recipe>/ and a table is printed; record them in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/out
for recipe in default smollm2_plain_lora; do
  out=bench/out/$recipe
  rm -rf "$out"
  /usr/bin/time -v -o "bench/out/$recipe.time" .venv/bin/deepspeed --num_gpus 2 launch/train.py \
    --config "recipes/$recipe.yaml" output_dir="$out" resume=never > "bench/out/$recipe.log" 2>&1
done
.venv/bin/python - <<'PY'
import json, re
from pathlib import Path
for recipe in ("default", "smollm2_plain_lora"):
    s = json.loads(Path(f"bench/out/{recipe}/summary.json").read_text())
    t = Path(f"bench/out/{recipe}.time").read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", t).group(1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 2**20
    print(f"{recipe}: accuracy {s['zero_shot'].get('eval_accuracy', 0):.1%} -> {s['final'].get('eval_accuracy', 0):.1%}, "
          f"eval loss {s['final']['eval_loss']:.4f}, trainable {s['trainable_params']:,} / plain {s['plain_lora_params']:,}, "
          f"kept layers {s.get('kept_layers', 'all')}, wall {wall}, peak RSS {rss:.2f} GiB, "
          f"main-stage tokens/s/rank {s['main']['tokens_per_s_per_rank']:.1f}")
PY
