#!/usr/bin/env python
"""GPU speed of plain LoRA against LoRA-drop's main stage on a 7B-shaped model (issue 9).

    python bench/gpu_speed.py [--out DIR] [--steps 12] [--micro-batch 2] [--seq 2048]
    python bench/gpu_speed.py --tiny          # the same flow on a tiny model, any device

One GPU, one rank, ZeRO-3, bf16, through the real CLI (``launch/train.py``): a random
LLaMA with Llama-2-7B's shapes (32 layers, hidden 4096, intermediate 11008, 32 heads,
vocab 32000; random weights, written once as bf16 safetensors) and rows that fill
``--seq`` tokens. Plain LoRA (``loradrop.enabled=false``) and LoRA-drop at a 50% parameter
budget (2 sampling steps, then the main stage) with r=16 on all seven projections. Both
run the same number of main steps; the first 2 are dropped as warm-up.

FLOP convention (loradrop_ds/throughput.py, which every run's log uses; stated with the
numbers in docs/BENCHMARKS.md): the base is frozen, so no
weight gradients are computed for it: per token, forward 2N and backward (input gradients
only) 2N, i.e. 4N for the N weights of the linear layers (attention, MLP, lm_head; the
embedding lookup does no multiply). Causal attention adds 2·L·s·d per token forward (QK^T
and AV, half of the s×s scores), twice that backward: 6·L·s·d. With activation checkpointing
the forward runs twice: 6N + 8·L·s·d. LoRA's own FLOPs (<1% at r=16) are not counted, so
the MFU is the base model's. Peak: the card's dense bf16 data-sheet figure
(throughput.PEAK_BF16_TFLOPS: 989.4 TFLOP/s for H100 SXM and H200); other cards get no MFU.

flash-attn is used when importable (``model.attn_implementation=auto``), else sdpa; the
report says which. Results: ``OUT/gpu_speed.json`` (``gpu_speed_tiny.json`` with --tiny).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from gpu_smoke import TINY_WIDTHS, cli, free_port, main_stage_numbers, make_data, make_model  # noqa: E402

from loradrop_ds.throughput import peak_for_name  # noqa: E402

LLAMA2_7B_WIDTHS = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                    "num_key_value_heads": 32, "vocab_size": 32000, "num_hidden_layers": 32}


def step_flops(widths: dict, recompute: bool):
    """The library's FLOP convention (loradrop_ds/throughput.py, the one every run logs) for these widths."""
    from transformers import LlamaConfig

    from loradrop_ds.model_dims import dims_from_config
    from loradrop_ds.throughput import StepFlops

    return StepFlops.for_model(dims_from_config(LlamaConfig(**widths), ["q_proj"]), recompute)


def flops_per_token(widths: dict, seq: int, recompute: bool) -> float:
    """Per token of full rows of ``seq`` tokens: 4N + 6·L·s·d (6N + 8·L·s·d with recomputation)."""
    return step_flops(widths, recompute).flops(seq, seq * seq) / seq


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/loradrop_gpu_speed"))
    parser.add_argument("--steps", type=int, default=12, help="main-stage steps per run (first 2 dropped)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on any device (checks the script)")
    parser.add_argument("--runs", nargs="+", default=["plain", "drop_budget0.5"],
                        choices=["plain", "drop_budget0.5", "hf_trainer"],
                        help="runs in this order; a name given again is a repeat (alternate them: plain hf_trainer "
                             "plain hf_trainer). hf_trainer: bench/hf_trainer_lora.py on plain's settings")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not args.tiny:
        print("gpu_speed: no CUDA device; use --tiny to check the script on CPU", file=sys.stderr)
        return 2
    widths = TINY_WIDTHS if args.tiny else LLAMA2_7B_WIDTHS
    seq = 128 if args.tiny else args.seq
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    report: dict = {"device": name, "torch": torch.__version__, "widths": widths, "seq": seq,
                    "micro_batch": args.micro_batch, "gradient_checkpointing": args.gradient_checkpointing,
                    "attention": "flash_attention_2" if importlib.util.find_spec("flash_attn") and device == "cuda"
                    else "sdpa",
                    "linear_weights_N": step_flops(widths, args.gradient_checkpointing).linear_weights,
                    "flops_per_token": flops_per_token(widths, seq, args.gradient_checkpointing),
                    "peak_flops": peak_for_name(name),
                    "command": "python bench/gpu_speed.py " + " ".join(sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    result_file = args.out / ("gpu_speed_tiny.json" if args.tiny else "gpu_speed.json")

    def save() -> None:
        result_file.write_text(json.dumps(report, indent=2))

    subprocess.run(["rm", "-rf", str(args.work)], check=True)
    model_dir, data_dir = args.work / "model", args.work / "data"
    t = time.perf_counter()
    make_model(model_dir, widths, device)
    make_data(data_dir, seq)
    report["setup_s"] = time.perf_counter() - t
    save()

    common = [f"model.path={model_dir}", "model.dtype=bfloat16",
              f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
              f"data.train_file={data_dir}/train.jsonl", f"data.eval_file={data_dir}/eval.jsonl",
              f"data.max_seq_len={seq}", "data.label_field=null", f"train.micro_batch_size={args.micro_batch}",
              "train.grad_accum=1", "train.warmup_steps=1", "train.lr=1e-4", "train.log_every=1",
              f"train.max_steps={args.steps}", "train.save_every=0", "train.eval_every=0",
              "lora.r=16", "lora.alpha=32", "lora.dropout=0.0",
              "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
              "dist.timeout_minutes=10"]
    if args.tiny:
        common.append("deepspeed=ds_configs/zero3_tiny.json")
    runs = {"plain": ["loradrop.enabled=false"],
            "drop_budget0.5": ["loradrop.sampling_steps=2", "loradrop.sample_ratio=0.1", "loradrop.param_budget=0.5"],
            "hf_trainer": ["loradrop.enabled=false"]}
    for i, run in enumerate(args.runs):
        repeat = args.runs[:i].count(run)
        key = run if repeat == 0 else f"{run}#{repeat + 1}"
        out_dir = args.work / key
        if run == "hf_trainer":
            entry = hf_trainer_run(common + runs[run], out_dir, args.steps)
        else:
            code, log, secs = cli([*common, *runs[run], f"output_dir={out_dir}"], timeout=600)
            entry = {"exit": code, "wall_s": secs}
            if code != 0:
                entry["log_tail"] = log[-3000:]
        if entry["exit"] == 0 and run == "hf_trainer":
            entry["tokens_per_s_per_gpu"] = entry.pop("tokens_per_s_per_rank")
            if report["peak_flops"]:
                entry["mfu"] = entry["tokens_per_s_per_gpu"] * report["flops_per_token"] / report["peak_flops"]
        elif entry["exit"] == 0:
            entry.update(main_stage_numbers(out_dir))
            summary = json.loads((out_dir / "summary.json").read_text())
            entry.update({k: summary.get(k) for k in ("trainable_params", "plain_lora_params", "kept_layers",
                                                      "rebuild_seconds")})
            entry["tokens_per_s_per_gpu"] = entry.pop("tokens_per_s")
            if report["peak_flops"]:
                entry["mfu"] = entry["tokens_per_s_per_gpu"] * report["flops_per_token"] / report["peak_flops"]
        report[key] = entry
        save()
        print(json.dumps({key: {k: v for k, v in entry.items() if k not in ("losses", "step_s")}}), flush=True)
    # Median over the repeats of each run's median step time.
    medians = {run: statistics.median(report[k]["median_step_s"] for k in report
                                      if k.split("#")[0] == run and isinstance(report[k], dict)
                                      and report[k].get("exit") == 0)
               for run in set(args.runs) if any(report[k].get("exit") == 0 for k in report
                                                 if k.split("#")[0] == run and isinstance(report[k], dict))}
    report["median_step_s_over_repeats"] = medians
    if "plain" in medians and "drop_budget0.5" in medians:
        report["drop_main_speed_vs_plain"] = medians["plain"] / medians["drop_budget0.5"]
    if "plain" in medians and "hf_trainer" in medians:
        report["cli_plain_speed_vs_hf_trainer"] = medians["hf_trainer"] / medians["plain"]
    save()
    print(json.dumps({k: v for k, v in report.items() if k.split("#")[0] not in runs}, indent=2))
    keys = [k for k in report if k.split("#")[0] in runs]
    return 0 if all(report[k].get("exit") == 0 for k in keys) else 1


def hf_trainer_run(overrides: list[str], out_dir: Path, steps: int) -> dict:
    """bench/hf_trainer_lora.py (transformers.Trainer + peft + the CLI's resolved ZeRO-3 config)
    on the same overrides. Median step time after 2 warm-up steps, as for the CLI runs
    (main_stage_numbers); tokens/s is the script's own, over the second half of the steps."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           "bench/hf_trainer_lora.py", "--out", str(out_dir / "result.json"), "--steps", str(steps),
           *[o for o in overrides if not o.startswith("train.max_steps")]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    entry: dict = {"exit": proc.returncode, "wall_s": time.perf_counter() - start}
    if proc.returncode != 0:
        entry["log_tail"] = (proc.stdout + proc.stderr)[-3000:]
        return entry
    hf = json.loads((out_dir / "result.json").read_text())
    entry.update({k: hf[k] for k in ("median_step_s", "tokens_per_s_per_rank", "peak_memory_gib", "trainable_params",
                                     "losses", "step_s")})
    entry["median_step_s"] = statistics.median(hf["step_s"][2:] or hf["step_s"])
    return entry


if __name__ == "__main__":
    sys.exit(main())
