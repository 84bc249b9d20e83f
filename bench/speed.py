#!/usr/bin/env python
"""Speed of LoRA-drop against plain LoRA and against the HF Trainer path, in one invocation.

    .venv/bin/python bench/speed.py [--steps 50] [--repeats 2] [--configs plain drop_T0.9]
        [--hooks-pairs 3] [--hf/--no-hf] [--nproc 2] [--repo DIR] [--out FILE]

Everything runs on the same model (the recipe's default, builtin SmolLM2-135M-Instruct),
data (data/wordnet_categories, tokenised by loradrop_ds.data), ZeRO-3 config
(ds_configs/zero3.json with the CLI's "auto" values) and ranks (``--nproc``, default 2,
torchrun), fp32 on CPU. Nothing else should run meanwhile.

1. **CLI runs**, alternated in each repeat (so drifts of the machine hit all alike): the
   real ``launch/train.py`` with ``train.max_steps=--steps`` (the recipe's 50 by default,
   so the whole run is the default run's), ``train.warmup_steps`` of the recipe,
   ``train.save_every=0`` (the checkpoints at the end of each stage are still written),
   ``train.eval_every=0``, ``data.max_eval_examples=--eval-examples`` (zero-shot and final
   eval, identical in every config):

   * ``plain``: plain LoRA in every layer (``loradrop.enabled=false``);
   * ``drop_T0.9``: LoRA-drop, the default (T = 0.9, 10 sampling steps on 10% of the data);
   * ``drop_budget0.5`` (opt-in, ``--configs``): ``loradrop.param_budget=0.5``, the layers
     that fit half of plain LoRA's trainable parameters.

   Per run, from ``metrics.jsonl`` and ``summary.json``: main-stage ``seconds_per_step``
   (median over the last half of the main steps: a fresh CPU process warms up over its
   first tens of steps), tokens/s per rank over the same steps (real tokens), peak memory
   (rank 0's: RSS since process start on CPU, CUDA allocated on GPU), trainable parameters,
   ``rebuild_seconds`` (LoRA-drop: released sampling engine -> new engine on the same base;
   plain: the one load of the base + LoRA + engine), stage seconds, and
   ``wall_seconds_this_process`` (launch/train.py's ``main()`` from its first line to
   summary.json; the launcher's wall, imports included, is ``launcher_wall_s``).

2. **HF Trainer** (``--hf``, default on; one run per repeat, in the same alternation):
   ``bench/hf_trainer_lora.py``: plain LoRA with transformers.Trainer + peft + DeepSpeed
   ZeRO-3, on the very micro-batches of the CLI's plain main stage, the same resolved
   ZeRO-3 config, AdamW, LR schedule and steps; per-step times from a TrainerCallback.

3. **Hooks cost** (``--hooks-pairs`` > 0, once, after the first repeat):
   ``bench/speed_hooks_worker.py``: sampling-stage steps (all layers LoRA, the sampling
   subset) with and without the ImportanceRecorder, alternating blocks on the same
   micro-batches; cost = median step with hooks / median step without - 1. It also
   measures rank 0's AdamW state bytes to check the formula below.

Optimizer-state bytes per rank (formula; DeepSpeed 0.19.8, torch AdamW as client
optimizer): ZeRO-3 gives each rank ceil(n / W) elements of every trainable parameter
(n elements, W ranks; a shared LoRA parameter counts once); AdamW keeps exp_avg and
exp_avg_sq in fp32 for them, so ``8 * sum_p ceil(n_p / W)`` bytes (+ a 4-byte step
counter per parameter group). For fp32 trainable parameters that is all: stage3.py
``_create_fp32_partitions`` reuses the parameter partition as the fp32 master copy when
it is already fp32 on the optimizer's device; for bf16/fp16 trainable parameters add
``4 * sum_p ceil(n_p / W)`` for the fp32 master partition. (ZeRO-3 also holds an fp32
gradient partition of the same size, not counted here.) The LoRA tensors of the default
model all have an even number of elements, so on 2 ranks this is 4 * trainable.
The hooks worker and the HF Trainer run report the measured bytes next to it.

Output: ``--out`` (default bench/results/speed.json) with every run's raw numbers and the
command, and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
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
    "drop_T0.9": ["loradrop.threshold=0.9"],
    # opt in: --configs plain drop_T0.9 drop_budget0.5
    "drop_budget0.5": ["loradrop.param_budget=0.5"],
}
DEFAULT_CONFIGS = ["plain", "drop_T0.9"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: Path, args: list[str], repo: Path, log: Path, timeout: float) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false",
               LORADROP_REPO=str(repo))
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{script.name} {' '.join(args)} failed (exit {proc.returncode}); "
                         f"last lines of {log}:\n{''.join(log.read_text().splitlines(True)[-40:])}")
    return wall


def tail_half(values: list) -> list:
    return values[len(values) // 2:]


def run_cli(args: argparse.Namespace, name: str, repeat: int, work: Path) -> dict:
    out_dir = work / f"{name}-{repeat}"
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides = [f"output_dir={out_dir}", "resume=never", f"train.max_steps={args.steps}", "train.save_every=0",
                 "train.eval_every=0", f"data.max_eval_examples={args.eval_examples}", "train.log_every=1",
                 *args.override, *CONFIGS[name]]
    log = work / f"{name}-{repeat}.log"
    wall = torchrun(args.nproc, args.repo / "launch" / "train.py", overrides, args.repo, log, args.timeout)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out_dir / "summary.json").read_text())

    def stage_steps(stage: str) -> list[dict]:
        return [r for r in records if r.get("stage") == stage and "seconds_per_step" in r]

    main, sampling = stage_steps("main"), stage_steps("sampling")
    tail = tail_half(main)
    tail_seconds = sum(r["seconds_per_step"] for r in tail)
    result = {
        "config": name, "repeat": repeat, "overrides": overrides, "log": str(log),
        "main_step_s": [r["seconds_per_step"] for r in main],
        "sampling_step_s": [r["seconds_per_step"] for r in sampling],
        "median_step_s": statistics.median(r["seconds_per_step"] for r in tail),
        "tokens_per_s_per_rank": sum(r["tokens_per_s_per_rank"] * r["seconds_per_step"] for r in tail)
        / max(tail_seconds, 1e-9),
        "median_sampling_step_s": statistics.median(r["seconds_per_step"] for r in sampling) if sampling else None,
        "peak_memory_gib": max(r["peak_memory_gib"] for r in main + sampling),
        "trainable_params": summary["trainable_params"], "plain_lora_params": summary["plain_lora_params"],
        "world_size": summary["world_size"], "kept_layers": summary.get("kept_layers"),
        "rebuild_s": summary.get("rebuild_seconds"),
        "sampling_s": (summary.get("sampling") or {}).get("seconds_this_process"),
        "main_s": summary["main"]["seconds_this_process"],
        "wall_s": summary["wall_seconds_this_process"], "launcher_wall_s": wall,
        "final_eval": summary.get("final"),
    }
    result["optimizer_state_bytes_per_rank"] = optimizer_bytes(result["trainable_params"], result["world_size"])
    return result


def optimizer_bytes(trainable: int, world_size: int) -> int:
    """8 * ceil(n / W) + 4 for one group (exact per parameter when every LoRA tensor's
    element count divides by W, as on the default model with W = 2)."""
    return 8 * math.ceil(trainable / world_size) + 4


def run_hf(args: argparse.Namespace, repeat: int, work: Path) -> dict:
    out = work / f"hf_trainer-{repeat}.json"
    out.unlink(missing_ok=True)
    log = work / f"hf_trainer-{repeat}.log"
    wall = torchrun(args.nproc, HERE / "bench" / "hf_trainer_lora.py",
                    ["--out", str(out), "--steps", str(args.hf_steps or args.steps), "--ds-config", args.hf_ds_config,
                     *args.override], args.repo, log, args.timeout)
    result = json.loads(out.read_text())
    result.update({"config": "hf_trainer", "repeat": repeat, "log": str(log), "launcher_wall_s": wall,
                   "wall_s": result["wall_seconds_this_process"],
                   "optimizer_state_bytes_per_rank": optimizer_bytes(result["trainable_params"],
                                                                     result["world_size"])})
    return result


def run_hooks(args: argparse.Namespace, work: Path) -> dict:
    out = work / "hooks.json"
    out.unlink(missing_ok=True)
    log = work / "hooks.log"
    wall = torchrun(args.nproc, HERE / "bench" / "speed_hooks_worker.py",
                    ["--out", str(out), "--warmup", str(args.hooks_warmup), "--pairs", str(args.hooks_pairs),
                     "--block", str(args.hooks_block), *args.override], args.repo, log, args.timeout)
    result = json.loads(out.read_text())
    result.update({"log": str(log), "launcher_wall_s": wall})
    return result


def summarise(runs: list[dict], names: list[str]) -> dict:
    table = {}
    for name in names:
        mine = [r for r in runs if r["config"] == name]
        if not mine:
            continue

        def med(key: str, mine: list[dict] = mine):
            values = [r[key] for r in mine if r.get(key) is not None]
            return (statistics.median(values), min(values), max(values)) if values else None

        table[name] = {"n": len(mine), "trainable_params": mine[0]["trainable_params"],
                       "kept_layers": mine[0].get("kept_layers"),
                       "optimizer_state_bytes_per_rank": mine[0]["optimizer_state_bytes_per_rank"],
                       **{key: med(key) for key in ("median_step_s", "tokens_per_s_per_rank", "peak_memory_gib",
                                                    "rebuild_s", "wall_s", "sampling_s", "main_s",
                                                    "median_sampling_step_s", "launcher_wall_s")}}
    if "plain" in table:
        plain_step, plain_wall = table["plain"]["median_step_s"][0], table["plain"]["wall_s"][0]
        for row in table.values():
            row["step_speed_vs_plain"] = plain_step / row["median_step_s"][0]
            row["wall_ratio_vs_plain"] = row["wall_s"][0] / plain_wall
        # Per repeat, each config against the plain run of the same repeat.
        for name, row in table.items():
            pairs = [(r, p) for r in runs if r["config"] == name
                     for p in runs if p["config"] == "plain" and p["repeat"] == r["repeat"]]
            row["step_speed_vs_plain_per_repeat"] = [p["median_step_s"] / r["median_step_s"] for r, p in pairs]
            row["wall_ratio_vs_plain_per_repeat"] = [r["wall_s"] / p["wall_s"] for r, p in pairs]
    return table


def fmt(triple, digits: int = 3, scale: float = 1.0) -> str:
    if triple is None:
        return "n/a"
    m, lo, hi = (v * scale for v in triple)
    if lo == hi:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def print_report(result: dict) -> None:
    table, hooks = result["table"], result.get("hooks")
    print(f"\n{result['steps']} main steps, {result['repeats']} repeat(s), {result['nproc']} ranks; medians over "
          "repeats (min-max); per run, s/step and tokens/s over the last half of the main steps\n")
    print("| config | trainable | s/step median (min-max) | step speed vs plain | tokens/s/rank | "
          "optimizer state bytes/rank | peak memory GiB (rank 0) | rebuild s | sampling s | main s | "
          "whole-run wall s | wall vs plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in table.items():
        speed = f"{row['step_speed_vs_plain']:.2f}x" if "step_speed_vs_plain" in row else "n/a"
        wall_ratio = f"{row['wall_ratio_vs_plain']:.3f}" if "wall_ratio_vs_plain" in row else "n/a"
        print(f"| {name} | {row['trainable_params']:,} | {fmt(row['median_step_s'])} | {speed} | "
              f"{fmt(row['tokens_per_s_per_rank'], 1)} | {row['optimizer_state_bytes_per_rank']:,} | "
              f"{fmt(row['peak_memory_gib'], 2)} | {fmt(row['rebuild_s'], 2)} | {fmt(row['sampling_s'], 1)} | "
              f"{fmt(row['main_s'], 1)} | {fmt(row['wall_s'], 1)} | {wall_ratio} |")
    if "hf_trainer" in table:
        print("\nhf_trainer: transformers.Trainer + peft + DeepSpeed ZeRO-3 (bench/hf_trainer_lora.py), the same "
              "micro-batches as plain's main stage; its wall s is its process (no eval, no save): not comparable "
              "to the CLI rows' whole run.")
    targets = result.get("targets", {})
    if targets:
        print("\nTargets (reported, not asserted):")
        for line in targets.values():
            print(f"- {line}")
    if hooks:
        print(f"\nHooks cost (bench/speed_hooks_worker.py, sampling stage, {hooks['pairs']} pairs of "
              f"{hooks['block']}-step blocks after {hooks['warmup_steps']} warm-up steps): median step "
              f"{hooks['median_step_s_with_hooks']:.3f} s with hooks "
              f"({hooks['min_max_with_hooks'][0]:.3f}-{hooks['min_max_with_hooks'][1]:.3f}), "
              f"{hooks['median_step_s_without_hooks']:.3f} s without "
              f"({hooks['min_max_without_hooks'][0]:.3f}-{hooks['min_max_without_hooks'][1]:.3f}): "
              f"cost {100 * hooks['hooks_cost_fraction']:+.2f}% (per pair: "
              + ", ".join(f"{100 * c:+.1f}%" for c in hooks["pair_cost_fractions"]) + ")"
              + (f"; paired (same micro-batch) {100 * hooks['paired_cost_fraction']:+.2f}%, total time "
                 f"{100 * hooks['total_time_cost_fraction']:+.2f}%" if "paired_cost_fraction" in hooks else ""))
        print(f"AdamW state bytes on rank 0 of the sampling engine (all {hooks['trainable_params']:,} LoRA "
              f"elements): measured {hooks['optimizer_state_bytes_rank0_measured']:,}, formula "
              f"8 x {hooks['partition_numel_rank0']:,} = {hooks['optimizer_state_bytes_rank0_formula']:,} (+4 step)")


def targets_report(table: dict, hooks: dict | None, sample_ratio: float, sampling_steps: int, steps: int) -> dict:
    out = {}
    drop = [n for n in table if n.startswith("drop")]
    for name in drop:
        row = table[name]
        if "step_speed_vs_plain" in row:
            ok = row["step_speed_vs_plain"] >= 1.0
            out[f"{name}_step"] = (f"{name} main-stage step speed vs plain {row['step_speed_vs_plain']:.2f}x "
                                   f"(target >= 1.00: {'met' if ok else 'NOT met'})")
        if "hf_trainer" in table:
            hf = table["hf_trainer"]["median_step_s"][0]
            faster = row["median_step_s"][0] < hf
            out[f"{name}_hf"] = (f"{name} {row['median_step_s'][0]:.3f} s/step vs HF Trainer {hf:.3f} "
                                 f"({hf / row['median_step_s'][0]:.2f}x; target faster: {'met' if faster else 'NOT met'})")
        if "wall_ratio_vs_plain" in row:
            limit = 1 + sample_ratio + 0.05
            out[f"{name}_wall"] = (f"{name} whole run {row['wall_ratio_vs_plain']:.3f} x plain's (target <= "
                                   f"1 + {sample_ratio} + 0.05 = {limit:.2f}: "
                                   f"{'met' if row['wall_ratio_vs_plain'] <= limit else 'NOT met'}; "
                                   f"{sampling_steps} sampling steps against {steps} main steps)")
    if hooks:
        # The paired estimate (same micro-batch with and without hooks) when measured: the
        # ratio of medians mixes in the step-time spread of the sequence lengths.
        cost = hooks.get("paired_cost_fraction", hooks["hooks_cost_fraction"])
        out["hooks"] = (f"hooks cost {100 * cost:+.2f}% of a sampling step (target <= 2%: "
                        f"{'met' if cost <= 0.02 else 'NOT met'})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="main-stage steps (the recipe's 50)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--eval-examples", type=int, default=16, help="data.max_eval_examples of the CLI runs")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="HF Trainer row")
    parser.add_argument("--hf-steps", type=int, default=None, help="HF Trainer steps (default --steps)")
    parser.add_argument("--hf-ds-config", choices=["resolved", "json"], default="resolved")
    parser.add_argument("--hooks-pairs", type=int, default=3, help="0: no hooks measurement")
    parser.add_argument("--hooks-block", type=int, default=4)
    parser.add_argument("--hooks-warmup", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    parser.add_argument("--override", action="append", default=[],
                        help="extra dotted.key=value for every run (e.g. model.dtype=bfloat16 on GPUs)")
    parser.add_argument("--repo", type=Path, default=HERE, help="checkout whose launch/train.py and loradrop_ds run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launched run")
    parser.add_argument("--out", type=Path, default=HERE / "bench" / "results" / "speed.json")
    args = parser.parse_args()
    args.repo = args.repo.resolve()
    work = HERE / "bench" / "out" / "speed"
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(args.repo))
    from loradrop_ds import config as config_lib

    cfg = config_lib.load_config(None, args.override)
    started = time.perf_counter()
    runs: list[dict] = []
    hooks = None
    order = list(args.configs) + (["hf_trainer"] if args.hf else [])
    for repeat in range(args.repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:  # ABC, CBA, ...: drift hits each alike
            result = run_hf(args, repeat, work) if name == "hf_trainer" else run_cli(args, name, repeat, work)
            runs.append(result)
            brief = {k: result.get(k) for k in ("config", "repeat", "median_step_s", "tokens_per_s_per_rank",
                                                "trainable_params", "rebuild_s", "wall_s", "peak_memory_gib")}
            print(json.dumps(brief), flush=True)
        if repeat == 0 and args.hooks_pairs > 0:
            hooks = run_hooks(args, work)
            print(json.dumps({k: hooks[k] for k in ("median_step_s_with_hooks", "median_step_s_without_hooks",
                                                    "hooks_cost_fraction")}), flush=True)

    table = summarise(runs, order)
    result = {"command": " ".join([sys.executable, *sys.argv]), "repo": str(args.repo), "steps": args.steps,
              "repeats": args.repeats, "nproc": args.nproc, "configs": {n: CONFIGS.get(n) for n in order},
              "sampling_steps": cfg.loradrop.sampling_steps, "sample_ratio": cfg.loradrop.sample_ratio,
              "total_seconds": time.perf_counter() - started, "runs": runs, "hooks": hooks, "table": table}
    result["targets"] = targets_report(table, hooks, cfg.loradrop.sample_ratio, cfg.loradrop.sampling_steps,
                                       args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_report(result)
    print(f"\nraw runs: {args.out}; logs and run directories: {work}; total {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
