#!/usr/bin/env python
"""The throughput levers of issue 18, one call: each alone and the best combination, on a
7B-shaped LLaMA through the real CLI (``launch/train.py``), one GPU, one rank, ZeRO-3, bf16.

    python bench/gpu_levers.py [--out DIR] [--steps 10] [--seq 2048]
    python bench/gpu_levers.py --tiny        # the same flow on a tiny model, any device (a dry run)

The model is a random LLaMA with Llama-2-7B's shapes (bench/gpu_speed.py's), rows fill
``--seq`` tokens, LoRA r = 16 on all seven projections, plain LoRA unless named. Every run
trains the same 8 rows per optimizer step (micro-batch x grad_accum = 8), in the same order,
so the losses of every run are comparable step by step. The runs, in order:

* ``baseline``: today's default, micro-batch 8 with recomputation, DeepSpeed's
  ``memory_efficient_linear`` on, fp32 adapters (peft's default), no liger, no TF32.
* one lever at a time on top of the baseline: ``no_recompute`` (the largest micro-batch of 8,
  4, 2 the planner says fits without recomputation), ``mel_off`` (memory_efficient_linear off),
  ``bf16_adapters`` (lora.compute_dtype=bfloat16), ``liger`` (model.liger=true), ``tf32``.
* ``best``: every lever that was faster than the baseline alone and trained the same (its
  losses at the first and last step within ``--loss-tol`` of the baseline's), with
  recomputation off at the largest micro-batch that then fits (memory levers make room).
* ``best_drop``: LoRA-drop (2 sampling steps, a 50% parameter budget) with ``best``'s settings:
  its main stage against ``best`` (plain LoRA).

Per run: tokens/s per GPU and MFU (medians of the logged steps after the first 2; the
library's FLOP convention, loradrop_ds/throughput.py), the measured peak allocated and
reserved memory, the planner's predicted peak for the same settings, and the loss at the first
and last step with its difference from the baseline. Results: ``OUT/gpu_levers.json``
(``gpu_levers_tiny.json`` with --tiny) and a markdown table on stdout for docs/BENCHMARKS.md.
A lever that fails (for example liger without the liger-kernel package, or on a CPU, where the
run refuses it) is recorded with its message and left out of ``best``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from gpu_smoke import TINY_WIDTHS, cli, make_data, make_model  # noqa: E402
from gpu_speed import LLAMA2_7B_WIDTHS  # noqa: E402

ROWS_PER_STEP = 8
SINGLE_LEVERS = {  # name: (overrides, memory_efficient_linear, recompute)
    "mel_off": ([], False, True),
    "bf16_adapters": (["lora.compute_dtype=bfloat16"], True, True),
    "liger": (["model.liger=true"], True, True),
    "tf32": (["train.tf32=true"], True, True),
}


def ds_config(work: Path, tiny: bool, memory_efficient_linear: bool) -> Path:
    """The shipped ZeRO-3 config with ``memory_efficient_linear`` set explicitly (a bool in the
    JSON wins over the "auto" rule of loradrop_ds/engine.py)."""
    src = REPO / "ds_configs" / ("zero3_tiny.json" if tiny else "zero3.json")
    ds = json.loads(src.read_text())
    ds.setdefault("zero_optimization", {})["memory_efficient_linear"] = memory_efficient_linear
    out = work / f"ds_mel_{str(memory_efficient_linear).lower()}.json"
    out.write_text(json.dumps(ds, indent=2))
    return out


def micro_batch_overrides(micro_batch: int, recompute: bool) -> list[str]:
    return [f"train.micro_batch_size={micro_batch}", f"train.grad_accum={ROWS_PER_STEP // micro_batch}",
            f"model.gradient_checkpointing={str(recompute).lower()}"]


def largest_fitting_micro_batch(overrides: list[str], device_memory: int | None) -> int | None:
    """The largest of 8, 4, 2 (divisors of the rows per step) the planner says fits this device
    without recomputation, with ``overrides`` (the memory levers) applied; None if none does."""
    from loradrop_ds import planner
    from loradrop_ds.config import load_config
    from loradrop_ds.model import resolve_attn_implementation

    for micro_batch in (8, 4, 2):
        cfg = load_config(None, [*overrides, *micro_batch_overrides(micro_batch, recompute=False)])
        attn = resolve_attn_implementation(cfg.model.attn_implementation, "cuda" if device_memory else "cpu",
                                           cfg.model.dtype)
        if planner.check_memory(cfg, 1, 1, device_memory, None if device_memory else planner.host_memory_bytes(),
                                attn_implementation=attn) is None:
            return micro_batch
    return None


def run_numbers(out_dir: Path, stage: str = "main") -> dict:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("stage") == stage and "loss" in r]
    timed = steps[2:] or steps
    summary = json.loads((out_dir / "summary.json").read_text())

    def median(key: str) -> float | None:
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"tokens_per_s_per_gpu": median("tokens_per_s_per_rank"), "tflops_per_gpu": median("tflops_per_rank"),
            "mfu": median("mfu"), "median_step_s": median("seconds_per_step"),
            "peak_allocated_gib": max(r["peak_memory_gib"] for r in steps),
            "peak_reserved_gib": max((r.get("peak_reserved_gib") or 0.0) for r in steps) or None,
            "predicted_peak_gib": summary.get(stage, {}).get("planned_peak_gib"),
            "losses": [r["loss"] for r in steps], "trainable_params": summary.get("trainable_params")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/loradrop_gpu_levers"))
    parser.add_argument("--steps", type=int, default=10, help="main-stage steps per run (the first 2 are not timed)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--loss-tol", type=float, default=0.02,
                        help="a lever trains the same when its losses at the first and last step are within this "
                             "of the baseline's (absolute; default 0.02)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on any device (checks the script)")
    parser.add_argument("--only", nargs="*", help="run only these single levers (default: all)")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not args.tiny:
        print("gpu_levers: no CUDA device; use --tiny to check the script on CPU", file=sys.stderr)
        return 2
    widths = TINY_WIDTHS if args.tiny else LLAMA2_7B_WIDTHS
    seq = 128 if args.tiny else args.seq
    device_memory = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    report: dict = {"device": name, "torch": torch.__version__, "widths": widths, "seq": seq, "steps": args.steps,
                    "rows_per_step": ROWS_PER_STEP, "loss_tol": args.loss_tol,
                    "command": "python bench/gpu_levers.py " + " ".join(sys.argv[1:]), "runs": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    result_file = args.out / ("gpu_levers_tiny.json" if args.tiny else "gpu_levers.json")

    def save() -> None:
        result_file.write_text(json.dumps(report, indent=2))

    started = time.perf_counter()
    subprocess.run(["rm", "-rf", str(args.work)], check=True)
    args.work.mkdir(parents=True)
    model_dir, data_dir = args.work / "model", args.work / "data"
    make_model(model_dir, widths, device)
    make_data(data_dir, seq)
    report["setup_s"] = time.perf_counter() - started
    common = [f"model.path={model_dir}", "model.dtype=bfloat16", f"data.train_file={data_dir}/train.jsonl",
              "data.eval_file=null", "data.label_field=null", f"data.max_seq_len={seq}",
              "train.warmup_steps=1", "train.lr=1e-4", "train.log_every=1", f"train.max_steps={args.steps}",
              "train.save_every=0", "train.eval_every=0", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0",
              "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
              "dist.timeout_minutes=10"]
    plain = ["loradrop.enabled=false"]

    def run(key: str, overrides: list[str], mel: bool, recompute: bool, micro_batch: int, compare: bool = True) -> dict:
        out_dir = args.work / key
        argv = [*common, *overrides, *micro_batch_overrides(micro_batch, recompute),
                f"deepspeed={ds_config(args.work, args.tiny, mel)}", f"output_dir={out_dir}"]
        code, log, secs = cli(argv, timeout=600)
        entry: dict = {"overrides": overrides, "memory_efficient_linear": mel, "recompute": recompute,
                       "micro_batch": micro_batch, "exit": code, "wall_s": secs}
        if code == 0:
            entry.update(run_numbers(out_dir))
        else:
            lines = [line for line in log.splitlines() if line.strip()]
            # The run's own one-line refusal (rank 0's "error: ..."), else the log's last line.
            entry["error"] = next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "")[-500:]
            entry["log_tail"] = log[-3000:]
        base = report["runs"].get("baseline")
        if code == 0 and base and base.get("exit") == 0 and compare:
            entry["loss_diff_first_last"] = [entry["losses"][0] - base["losses"][0],
                                             entry["losses"][-1] - base["losses"][-1]]
            entry["trains_the_same"] = all(abs(d) <= args.loss_tol for d in entry["loss_diff_first_last"])
            if base.get("tokens_per_s_per_gpu") and entry.get("tokens_per_s_per_gpu"):
                entry["speedup"] = entry["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
        report["runs"][key] = entry
        save()
        print(json.dumps({key: {k: v for k, v in entry.items() if k not in ("losses", "log_tail")}}), flush=True)
        return entry

    baseline = run("baseline", plain, mel=True, recompute=True, micro_batch=8)
    if baseline["exit"] != 0:
        print(baseline.get("log_tail", ""), file=sys.stderr)
        return 1
    fit = largest_fitting_micro_batch([*common, *plain, f"deepspeed={ds_config(args.work, args.tiny, True)}"],
                                      device_memory)
    report["no_recompute_micro_batch"] = fit
    if fit is not None:
        run("no_recompute", plain, mel=True, recompute=False, micro_batch=fit)
    for key, (overrides, mel, recompute) in SINGLE_LEVERS.items():
        if args.only is None or key in args.only:
            run(key, [*plain, *overrides], mel=mel, recompute=recompute, micro_batch=8)

    helped = [key for key in SINGLE_LEVERS if report["runs"].get(key, {}).get("trains_the_same")
              and report["runs"][key].get("speedup", 0.0) > 1.0]
    best_overrides = [o for key in helped for o in SINGLE_LEVERS[key][0]]
    best_mel = "mel_off" not in helped
    best_fit = largest_fitting_micro_batch([*common, *plain, *best_overrides,
                                            f"deepspeed={ds_config(args.work, args.tiny, best_mel)}"], device_memory)
    report["best"] = {"levers": helped, "micro_batch": best_fit, "memory_efficient_linear": best_mel}
    if best_fit is not None:
        run("best", [*plain, *best_overrides], mel=best_mel, recompute=False, micro_batch=best_fit)
    else:  # nothing fits without recomputation: the best levers with it
        run("best", [*plain, *best_overrides], mel=best_mel, recompute=True, micro_batch=8)
    best = report["runs"]["best"]
    drop = ["loradrop.sampling_steps=2", "loradrop.sample_ratio=0.1", "loradrop.param_budget=0.5"]
    # LoRA-drop trains another model: its losses are not compared with the baseline's.
    best_drop = run("best_drop", [*drop, *best_overrides], mel=best_mel, recompute=best["recompute"],
                    micro_batch=best["micro_batch"], compare=False)
    if best.get("tokens_per_s_per_gpu") and best_drop.get("tokens_per_s_per_gpu"):
        report["drop_main_vs_plain"] = best_drop["tokens_per_s_per_gpu"] / best["tokens_per_s_per_gpu"]
    report["total_s"] = time.perf_counter() - started
    save()
    print(table(report))
    # A single lever may fail (it is then left out of best); the baseline, best and best_drop may not.
    return 0 if all(report["runs"][k]["exit"] == 0 for k in ("baseline", "best", "best_drop")) else 1


def table(report: dict) -> str:
    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [f"{report['device']}, {report['seq']}-token rows, {report['rows_per_step']} rows per step, "
             f"{report['steps']} steps: `{report['command']}`", "",
             "| run | micro-batch | recompute | tokens/s/GPU | x baseline | MFU | peak alloc (predicted) | reserved "
             "| loss first / last (diff) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in report["runs"].items():
        if r["exit"] != 0:
            lines.append(f"| {key} | {r['micro_batch']} | {r['recompute']} | failed: {r.get('error', '')[:120]} "
                         "| | | | | |")
            continue
        diff = r.get("loss_diff_first_last")
        loss_diff = (f" ({diff[0]:+.4f} / {diff[1]:+.4f})" if diff
                     else " (the reference)" if key == "baseline" else " (another model)")
        lines.append(f"| {key} | {r['micro_batch']} | {r['recompute']} | {fmt(r['tokens_per_s_per_gpu'], ',.0f')} "
                     f"| {fmt(r.get('speedup'), '.2f')} | {fmt(r['mfu'], '.1%')} | {fmt(r['peak_allocated_gib'], '.1f')} "
                     f"({fmt(r['predicted_peak_gib'], '.1f')}) GiB | {fmt(r['peak_reserved_gib'], '.1f')} | "
                     f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f}{loss_diff} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
