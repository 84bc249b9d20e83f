#!/usr/bin/env python
"""The memory planner's figures for every recipe, the peft anchor and the measured CPU run.

    .venv/bin/python bench/planner.py                  (writes bench/results/planner.json)

For each recipe in recipes/ it records the planner's per-stage rows (bytes per GPU or rank,
and per node) on the hardware the recipe's header names (the builtin model: this CPU machine,
2 ranks; the hub models: one node of 8 x 80 GB), plus a few other layouts. Two comparisons:

* the peft docs' Llama-2-70B LoRA on 8 x H100 (about 64 GB per GPU), whose settings are
  ``planner.peft_anchor_spec()``;
* the default CPU run (recipes/default.yaml, 2 ranks, fp32), whose measured peak RSS per rank
  (max over the ranks, /usr/bin/time) is in bench/RESULTS.md; the planner's rank-0 figure is
  given at the recipe's data.max_seq_len (its bound) and at the length the batches really pad
  to (the longest WordNet example is 38 tokens);
* the GPU runs of docs/BENCHMARKS.md section 5 (one H200, one rank, sdpa), whose peak allocated
  memory (``torch.cuda.max_memory_allocated`` over the main stage) is in bench/results: the
  planner's tensors (its total less the allocator and CUDA-context allowances) for the same
  settings, read from each result file and from the script that ran it.

It also measures the runtime constant the CPU figures use: the RSS of a fresh interpreter
after importing torch, deepspeed, transformers, peft and datasets.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loradrop_ds import planner  # noqa: E402
from loradrop_ds.config import load_config  # noqa: E402

# bench/RESULTS.md, "Default run vs plain LoRA (2026-11-25)": peak RSS of the largest rank.
MEASURED_PEAK_RSS_GIB = {"default.yaml": 3.25, "smollm2_plain_lora.yaml": 3.34}

# (recipe, overrides, nodes, GPUs per node, GPU memory or None for a CPU run)
LAYOUTS = [
    ("llama2_7b_loradrop.yaml", [], 1, 1, "80GB"),
    ("llama3_70b_loradrop.yaml", ["deepspeed=ds_configs/zero3_hpz.json", "train.grad_accum=1"], 4, 8, "80GB"),
    ("llama3_70b_loradrop.yaml", [], 1, 8, "40GB"),
    ("llama3_70b_loradrop.yaml", [], 1, 1, "24GB"),
]


def default_layout(cfg) -> tuple[int, int, str | None]:
    return (1, 2, None) if cfg.model.path.startswith("builtin:") else (1, 8, "80GB")


def plan_record(recipe: str, overrides: list[str], nodes: int, gpus: int, gpu_mem: str | None) -> dict:
    cfg = load_config(REPO / "recipes" / recipe, overrides)
    device_memory = planner.parse_size(gpu_mem) if gpu_mem else None
    host_memory = planner.host_memory_bytes() if gpu_mem is None else None
    plan = planner.plan_for_config(cfg, nodes * gpus, gpus, device_memory, host_memory)
    command = (f"python launch/plan.py --config recipes/{recipe} --nodes {nodes} --gpus-per-node {gpus} "
               + (f"--gpu-mem {gpu_mem}" if gpu_mem else "--cpu") + "".join(f" {o}" for o in overrides))
    return {"command": command, **plan_figures(plan),
            "message": None if plan.fits else planner.explain_misfit(plan)}


def plan_figures(plan: planner.MemoryPlan) -> dict:
    spec = plan.spec
    return {
        "model": spec.model.name, "model_config_source": spec.model.source, "parameters": spec.model.total_params,
        "world_size": spec.world_size, "gpus_per_node": spec.gpus_per_node, "device": spec.device,
        "device_memory_bytes": plan.device_memory, "host_memory_bytes": plan.host_memory,
        "tokens_per_micro_batch": spec.tokens_per_micro_batch, "gradient_checkpointing": spec.gradient_checkpointing,
        "attn_implementation": spec.attn_implementation,
        "stages": [{"stage": s.stage, "lora_params": s.lora_params, "device_rows_bytes": s.device_rows,
                    "device_total_bytes": s.device_total, "device_total_gib": round(s.device_total / planner.GiB, 2),
                    "activations_checkpointing_on_bytes": s.activations_ckpt_on,
                    "activations_checkpointing_off_bytes": s.activations_ckpt_off,
                    "host_rows_bytes": s.host_rows, "host_total_gib": round(s.host_total / planner.GiB, 2),
                    "checkpoint_page_cache_bytes": s.host_reclaimable} for s in plan.stages],
        "fits": plan.fits,
    }


# (result file, run in it, the overrides bench/gpu_speed.py or bench/gpu_smoke.py ran it with)
GPU_RUNS = [
    ("gpu_speed_mb2.json", "plain", ["lora.dropout=0.0"]),
    ("gpu_speed_mb8_gc.json", "plain", ["lora.dropout=0.0"]),
    ("gpu_smoke.json", "plain", ["lora.dropout=0.05", "train.micro_batch_size=1", "model.gradient_checkpointing=true",
                                 "data.max_seq_len=2048"]),
]
# bench/gpu_smoke.py's model (Llama-3-70B layer widths, 4 layers) and bench/gpu_speed.py's (Llama-2-7B shapes)
GPU_SMOKE_WIDTHS = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "vocab_size": 128256, "num_hidden_layers": 4}


def gpu_runs_vs_measured() -> list[dict]:
    from transformers import AutoConfig

    from loradrop_ds.model_dims import dims_from_config

    records = []
    for file, run, overrides in GPU_RUNS:
        result = json.loads((REPO / "bench" / "results" / file).read_text())
        widths = result.get("widths", GPU_SMOKE_WIDTHS)
        settings = []
        if "micro_batch" in result:
            settings = [f"train.micro_batch_size={result['micro_batch']}", f"data.max_seq_len={result['seq']}",
                        f"model.gradient_checkpointing={str(result['gradient_checkpointing']).lower()}"]
        cfg = load_config(None, ["model.dtype=bfloat16", "lora.r=16", "lora.alpha=32", "loradrop.enabled=false",
                                 "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                                 "train.grad_accum=1", *settings, *overrides])
        dims = dims_from_config(AutoConfig.for_model("llama", **widths), cfg.lora.target_modules)
        plan = planner.plan_for_config(cfg, 1, 1, planner.parse_size("141GB"), None, device="cuda",
                                       attn_implementation=result.get("attention", "sdpa"), dims=dims)
        (stage,) = plan.stages
        tensors = stage.tensor_bytes
        measured = result[run]["peak_memory_gib"]
        records.append({"result": f"bench/results/{file}", "run": run, "device": result["device"],
                        "micro_batch_size": cfg.train.micro_batch_size, "seq_len": cfg.data.max_seq_len,
                        "gradient_checkpointing": cfg.model.gradient_checkpointing,
                        "memory_efficient_linear": plan.spec.zero.memory_efficient_linear,
                        "estimated_tensors_gib": round(tensors / planner.GiB, 2), "measured_max_allocated_gib":
                        round(measured, 2), "estimate_over_measured": round(tensors / planner.GiB / measured, 3)})
    return records


def measure_runtime_rss() -> float:
    code = ("import resource, torch, deepspeed, transformers, peft, datasets; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> int:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    runs = []
    for recipe in sorted(p.name for p in (REPO / "recipes").glob("*.yaml")):
        runs.append(plan_record(recipe, [], *default_layout(load_config(REPO / "recipes" / recipe))))
    runs += [plan_record(*layout) for layout in LAYOUTS]

    anchor = planner.estimate(planner.peft_anchor_spec(), planner.parse_size("80GB"), None)
    (stage,) = anchor.stages
    tensors = stage.tensor_bytes
    anchor_record = {
        "source": "huggingface/peft docs/source/accelerate/deepspeed.md (run_peft_deepspeed.sh): 64 GB (80%) per GPU",
        "reference_bytes": planner.PEFT_ANCHOR_BYTES, **plan_figures(anchor),
        "estimate_over_reference": round(stage.device_total / planner.PEFT_ANCHOR_BYTES, 3),
        "tensors_only_over_reference": round(tensors / planner.PEFT_ANCHOR_BYTES, 3),
        "estimate_over_64e9_bytes": round(stage.device_total / 64e9, 3),
    }

    cpu = []
    for recipe, measured in MEASURED_PEAK_RSS_GIB.items():
        for seq_len in (None, 40):
            overrides = [f"data.max_seq_len={seq_len}"] if seq_len else []
            cfg = load_config(REPO / "recipes" / recipe, overrides)
            plan = planner.plan_for_config(cfg, 2, 2, None, planner.host_memory_bytes())
            peak = max(planner.rank0_peak_rss_cpu(plan.spec, s) for s in plan.stages)
            cpu.append({"recipe": recipe, "max_seq_len": cfg.data.max_seq_len,
                        "estimated_rank0_peak_rss_gib": round(peak / planner.GiB, 2),
                        "measured_peak_rss_gib": measured, "estimate_over_measured": round(peak / planner.GiB / measured, 3)})

    result = {
        "command": "bench/planner.py",
        "date": time.strftime("%Y-%m-%d"),
        "constants": {"SAFETY_MARGIN": planner.SAFETY_MARGIN, "CUDA_RUNTIME_BYTES": planner.CUDA_RUNTIME_BYTES,
                      "ALLOCATOR_RESERVE_FRACTION": planner.ALLOCATOR_RESERVE_FRACTION,
                      "HOST_RUNTIME_BYTES_CPU": planner.HOST_RUNTIME_BYTES_CPU,
                      "HOST_RUNTIME_BYTES_GPU": planner.HOST_RUNTIME_BYTES_GPU},
        "measured_runtime_rss_gib_after_imports": round(measure_runtime_rss(), 3),
        "runs": runs, "peft_anchor": anchor_record, "cpu_default_vs_measured": cpu,
        "gpu_runs_vs_measured": gpu_runs_vs_measured(),
    }
    out = REPO / "bench" / "results" / "planner.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for run in runs:
        totals = ", ".join(f"{s['stage']} {s['device_total_gib']} GiB" for s in run["stages"])
        print(f"{run['command']}: {totals}, fits {run['fits']}")
    print(f"peft anchor: {stage.device_total / planner.GiB:.1f} GiB estimated vs 64 GiB "
          f"({anchor_record['estimate_over_reference']:.3f}; tensors only {anchor_record['tensors_only_over_reference']:.3f})")
    for c in cpu:
        print(f"CPU {c['recipe']} max_seq_len {c['max_seq_len']}: rank 0 {c['estimated_rank0_peak_rss_gib']} GiB "
              f"estimated vs {c['measured_peak_rss_gib']} GiB measured ({c['estimate_over_measured']:.3f})")
    for g in result["gpu_runs_vs_measured"]:
        print(f"GPU {g['result']} {g['run']}: {g['estimated_tensors_gib']} GiB of tensors estimated vs "
              f"{g['measured_max_allocated_gib']} GiB max allocated ({g['estimate_over_measured']:.3f})")
    print(f"runtime RSS after imports: {result['measured_runtime_rss_gib_after_imports']} GiB; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
