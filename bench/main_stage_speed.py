#!/usr/bin/env python
"""Main-stage step time of LoRA-drop against plain LoRA, and the rebuild's wall time.

    .venv/bin/python bench/main_stage_speed.py [--steps 40] [--repeats 2] [--repo DIR] [--out FILE]

Runs the real CLI (``torchrun --nproc_per_node 2 launch/train.py``) on the embedded default
model and task with ZeRO-3 (ds_configs/zero3.json, fp32), alternating the configurations
in each repeat so that drifts of the machine hit all of them alike:

* ``plain``: plain LoRA in every layer (loradrop.enabled=false);
* ``drop_T1.0``: LoRA-drop keeping every layer: plain LoRA's structure after a sampling
  stage and the in-place rebuild (a control: it separates the cost of the structure
  from that of the run's history);
* ``drop_T0.9``: LoRA-drop at T = 0.9 (about half the layers share one LoRA);
* ``drop_T0.5``: LoRA-drop at T = 0.5 (most layers share it);
* ``drop_T0.5_lora_partitioned``: the same with the LoRA parameters partitioned like base
  weights (stage3_param_persistence_threshold 1000 instead of "auto"), gathered at every use.

Per run: the median main-stage ``seconds_per_step`` over the last half of the steps
(metrics.jsonl). On CPU a fresh process warms up over tens of steps (steps of the first
stage run 30-50% slower), so LoRA-drop's main stage, which follows the sampling stage in the
same process, starts warm and plain LoRA's does not: ``drop_T1.0`` is the like-for-like
baseline for the structure, ``plain`` the one for the user's wall time. Also the rebuild's
wall time (``rebuild_seconds`` in summary.json: for LoRA-drop, from the released sampling
engine to the new one; for plain LoRA, the load of the base), trainable parameters.
``--repo`` runs another checkout's launch/train.py with this environment (to measure an
older version). Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

CONFIGS = {
    "plain": ["loradrop.enabled=false"],
    "drop_T1.0": ["loradrop.threshold=1.0"],
    "drop_T0.9": ["loradrop.threshold=0.9"],
    "drop_T0.5": ["loradrop.threshold=0.5"],
    "drop_T0.5_lora_partitioned": ["loradrop.threshold=0.5", "deepspeed={partitioned}"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(repo: Path, name: str, out_dir: Path, steps: int, partitioned: Path) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides = [o.format(partitioned=partitioned) for o in CONFIGS[name]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(repo / "launch" / "train.py"), f"output_dir={out_dir}", "resume=never", f"train.max_steps={steps}",
           "train.save_every=0", "train.eval_every=0", "data.max_eval_examples=16", "train.warmup_steps=2",
           *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    main = [r for r in records if r["stage"] == "main" and "loss" in r]
    per_step = [r["seconds_per_step"] if "seconds_per_step" in r else None for r in main]
    if None in per_step:  # an older checkout: derive step times from the record timestamps
        times = [r["time"] for r in main]
        per_step = [b - a for a, b in zip(times, times[1:], strict=False)]
    summary = json.loads((out_dir / "summary.json").read_text())
    return {"config": name, "median_step_s": statistics.median(per_step[len(per_step) // 2:]),
            "rebuild_s": summary.get("rebuild_seconds"), "wall_s": wall,
            "trainable_params": summary["trainable_params"], "kept_layers": summary.get("kept_layers")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--repo", type=Path, default=HERE, help="checkout whose launch/train.py runs")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=HERE / "bench" / "results" / "main_stage_speed.json")
    args = parser.parse_args()
    work = HERE / "bench" / "out" / ("main_stage_speed" + ("" if args.repo.resolve() == HERE else "_other_repo"))
    work.mkdir(parents=True, exist_ok=True)
    zero3 = json.loads((HERE / "ds_configs" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 1000  # norms (576) resident, LoRA not
    partitioned = work / "zero3_lora_partitioned.json"
    partitioned.write_text(json.dumps(zero3))

    runs = []
    for repeat in range(args.repeats):
        for name in args.configs:
            out_dir = work / f"{name}-{repeat}"
            result = run_once(args.repo.resolve(), name, out_dir, args.steps, partitioned)
            runs.append(result)
            print(json.dumps(result), flush=True)

    table = {}
    for name in args.configs:
        mine = [r for r in runs if r["config"] == name]
        steps = [r["median_step_s"] for r in mine]
        table[name] = {"median_step_s": statistics.median(steps), "min_step_s": min(steps), "max_step_s": max(steps),
                       "rebuild_s": statistics.median(r["rebuild_s"] for r in mine if r["rebuild_s"] is not None)
                       if any(r["rebuild_s"] is not None for r in mine) else None,
                       "trainable_params": mine[0]["trainable_params"], "kept_layers": mine[0]["kept_layers"]}
    for baseline in ("plain", "drop_T1.0"):
        if baseline in table:
            for row in table.values():
                row[f"speed_vs_{baseline}"] = table[baseline]["median_step_s"] / row["median_step_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "repo": str(args.repo), "steps": args.steps,
                                    "repeats": args.repeats, "runs": runs, "table": table}, indent=2))
    print("\n| config | trainable | median s/step (min-max) | speed vs plain | vs drop_T1.0 | rebuild s |")
    print("|---|---|---|---|---|---|")
    for name, row in table.items():
        rebuild = f"{row['rebuild_s']:.2f}" if row["rebuild_s"] is not None else "n/a"
        print(f"| {name} | {row['trainable_params']:,} | {row['median_step_s']:.3f} ({row['min_step_s']:.3f}-"
              f"{row['max_step_s']:.3f}) | {row.get('speed_vs_plain', float('nan')):.2f}x | "
              f"{row.get('speed_vs_drop_T1.0', float('nan')):.2f}x | {rebuild} |")


if __name__ == "__main__":
    main()
