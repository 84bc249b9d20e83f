#!/usr/bin/env python
"""ALLoRA, LoRAPrune and the HF Trainer reference on one GPU (issues 9 and 10; run by
bench/gpu_methods.sh).

    python bench/gpu_methods.py [--out DIR] [--tiny]

A random LLaMA with Llama-3-8B's layer widths (hidden 4096, intermediate 14336, 32 heads /
8 KV heads, vocab 128256) and 4 layers, bf16, sdpa, activation checkpointing, rows of 1024
tokens, LoRA r = 16 on all seven projections, 1 GPU, ZeRO-3 (the same helpers as
bench/gpu_smoke.py). Parts, in order, each saved as soon as it ends:

1. ``plain``: plain LoRA through ``launch/train.py`` (loradrop.enabled=false), 12 steps: the
   step-time reference.
2. ``prune``: the same with ``prune.target_sparsity=0.5`` (every 2 steps, cubic over 10-60%
   of the steps, no layer exempt, so the export is smaller), exported with ``--format
   pruned``, reloaded in plain transformers on the GPU against the run's final (masked)
   logits; step time against ``plain``.
3. ``inference``: the unpruned base (the merged model has its shapes) against the pruned
   export in plain transformers, bf16: forward passes of 8 x 1024 tokens, alternated,
   median wall time (``torch.cuda.synchronize``), tokens/s, peak allocated memory.
4. ``allora``: LoRA-drop (T = 0.5) with ``lora.variant=allora`` (dropout 0, alpha = r),
   12 steps: losses finite, the adapter reloaded in plain peft against the trained logits,
   step time against ``plain`` (with LoRA-drop: not a measure of ALLoRA's own cost).
5. ``hf_trainer``: bench/hf_trainer_lora.py (transformers.Trainer + peft + the same
   resolved ZeRO-3 config) with ``plain``'s overrides and steps: step time against the CLI.

Results: ``OUT/gpu_methods.json`` (the card's name in it). ``--tiny``: the same flow with a
tiny model on whatever device there is (CPU here), to check the script, not the GPU.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_smoke import REPO, TINY_WIDTHS, cli, compare_reloaded_adapter, free_port, make_data, make_model  # noqa: E402

WIDTHS = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
          "vocab_size": 128256, "num_hidden_layers": 4}


def main_stage(run_dir: Path) -> dict:
    """Main-stage step times (all, and the median of the second half, the window
    bench/hf_trainer_lora.py uses), peak memory, losses."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    main = [r for r in records if r.get("stage") == "main" and "loss" in r]
    steps = [r["seconds_per_step"] for r in main]
    return {"step_s": steps, "median_step_s": statistics.median(steps[len(steps) // 2:]),
            "peak_memory_gib": max(r["peak_memory_gib"] for r in main), "losses": [r["loss"] for r in main]}


def reload_export(export_dir: Path, run_dir: Path, device: str) -> float:
    """Max |logit difference| between an export (merged or pruned) in plain transformers, bf16,
    and the run's final eval logits (for a pruned run: the masked model)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    probe = load_file(run_dir / "probe_logits.safetensors")
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(device).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"].to(device),
                       attention_mask=probe["attention_mask"].to(device)).logits.float().cpu()
    mask = probe["attention_mask"].bool()
    del model
    return float((logits[mask] - probe["logits"][mask]).abs().max())


def max_abs_logit(run_dir: Path) -> float:
    from safetensors.torch import load_file

    probe = load_file(run_dir / "probe_logits.safetensors")
    return float(probe["logits"][probe["attention_mask"].bool()].abs().max())


def time_inference(models: dict[str, Path], device: str, seq: int, repeats: int = 5) -> dict:
    """Forward passes of 8 x ``seq`` tokens in bf16, alternated between the models."""
    import torch
    from transformers import AutoModelForCausalLM

    results: dict = {}
    loaded = {}
    for name, path in models.items():
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
        model = model.to(device).eval()
        cfg = model.config
        results[name] = {"params": sum(p.numel() for p in model.parameters()),
                         "config": {k: getattr(cfg, k) for k in ("num_attention_heads", "num_key_value_heads",
                                                                  "head_dim", "intermediate_size")},
                         "seconds": []}
        ids = torch.randint(0, cfg.vocab_size, (8, seq), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            model(input_ids=ids)  # warm-up, and the peak of one forward
        if device == "cuda":
            torch.cuda.synchronize()
            results[name]["weights_gib"] = (torch.cuda.memory_allocated() - before) / 2**30
            results[name]["peak_forward_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
        loaded[name] = (model, ids)
    with torch.no_grad():
        for _ in range(repeats):
            for name, (model, ids) in loaded.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(4):
                    model(input_ids=ids)
                if device == "cuda":
                    torch.cuda.synchronize()
                results[name]["seconds"].append(time.perf_counter() - start)
    for r in results.values():
        r["median_seconds"] = statistics.median(r["seconds"])
        r["tokens_per_s"] = 4 * 8 * seq / r["median_seconds"]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/loradrop_gpu_methods"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model on any device (checks the script)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--parts", nargs="+", default=["plain", "prune", "allora", "hf_trainer"],
                        choices=["plain", "prune", "allora", "hf_trainer"], help="which parts (default: all)")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not args.tiny:
        print("gpu_methods: no CUDA device; use --tiny to check the script on CPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "tiny": args.tiny, "steps": args.steps}
    for name in ("deepspeed", "transformers", "peft"):
        report[name] = __import__(name).__version__
    args.out.mkdir(parents=True, exist_ok=True)
    result_file = args.out / ("gpu_methods_tiny.json" if args.tiny else "gpu_methods.json")

    def save() -> None:  # after every part: a run cut short still reports what it reached
        result_file.write_text(json.dumps(report, indent=2))

    work = args.work
    subprocess.run(["rm", "-rf", str(work)], check=True)
    model_dir, data_dir = work / "model", work / "data"
    t = time.perf_counter()
    make_model(model_dir, TINY_WIDTHS if args.tiny else WIDTHS, device)
    seq = 256 if args.tiny else 1024
    make_data(data_dir, seq)
    report["setup_s"] = time.perf_counter() - t
    save()

    common = [f"model.path={model_dir}", "model.dtype=bfloat16", "model.gradient_checkpointing=true",
              f"data.train_file={data_dir}/train.jsonl", f"data.eval_file={data_dir}/eval.jsonl",
              f"data.max_seq_len={seq}", "data.label_field=null", "train.micro_batch_size=2", "train.grad_accum=1",
              "train.warmup_steps=1", "train.lr=1e-3", "train.log_every=1", "train.save_every=0",
              f"train.max_steps={args.steps}", "train.save_probe_logits=true", "dist.timeout_minutes=10",
              "lora.r=16", "lora.alpha=32", "lora.dropout=0.05",
              "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
              "loradrop.sampling_steps=4", "loradrop.sample_ratio=0.1", "loradrop.threshold=0.5"]
    if args.tiny:
        common.append("deepspeed=ds_configs/zero3_tiny.json")
    plain_args = [*common, "loradrop.enabled=false"]

    def run_part(name: str, extra: list[str]) -> Path | None:
        run_dir = work / name
        code, log, secs = cli([*extra, f"output_dir={run_dir}"])
        report[name] = {"exit": code, "seconds": secs}
        if code != 0:
            report[name]["log_tail"] = log[-3000:]
            save()
            return None
        report[name].update(main_stage(run_dir))
        summary = json.loads((run_dir / "summary.json").read_text())
        report[name]["trainable_params"] = summary.get("trainable_params")
        if name != "plain" and report.get("plain", {}).get("median_step_s"):
            report[name]["step_time_vs_plain"] = report[name]["median_step_s"] / report["plain"]["median_step_s"]
        save()
        return run_dir

    # 1. Plain LoRA: the reference.
    if "plain" in args.parts:
        run_part("plain", plain_args)

    # 2. LoRAPrune at 50%, exported and reloaded.
    prune_args = [*plain_args, "prune.target_sparsity=0.5", "prune.every=2", "prune.start_fraction=0.1",
                  "prune.end_fraction=0.6", "prune.exempt_first_fraction=0", "prune.exempt_last=false"]
    prune_dir = run_part("prune", prune_args) if "prune" in args.parts else None
    if prune_dir is not None:
        summary = json.loads((prune_dir / "summary.json").read_text())
        report["prune"]["summary"] = summary.get("prune")
        export_dir = work / "prune-export"
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "launch/export.py", str(prune_dir), "--out", str(export_dir),
                               "--format", "pruned"], cwd=REPO, capture_output=True, text=True)
        report["prune"]["export"] = {"exit": proc.returncode, "seconds": time.perf_counter() - t}
        if proc.returncode != 0:
            report["prune"]["export"]["log_tail"] = (proc.stdout + proc.stderr)[-3000:]
        else:
            report["prune"]["reloaded_max_abs_logit_diff"] = reload_export(export_dir, prune_dir, device)
            report["prune"]["max_abs_logit"] = max_abs_logit(prune_dir)
            # The same check for plain LoRA merged into bf16 weights: the rounding of a merge
            # alone, the yardstick for the pruned export's difference.
            if (work / "plain" / "summary.json").exists():
                merged = work / "plain-merged"
                subprocess.run([sys.executable, "launch/export.py", str(work / "plain"), "--out", str(merged),
                                "--format", "merged"], cwd=REPO, check=True, capture_output=True)
                report["plain"]["merged_reloaded_max_abs_logit_diff"] = reload_export(merged, work / "plain", device)
                report["plain"]["max_abs_logit"] = max_abs_logit(work / "plain")
            save()
            # 3. Inference: unpruned (base shapes) against pruned.
            report["inference"] = time_inference({"unpruned": model_dir, "pruned": export_dir}, device, seq)
            report["inference"]["pruned_speedup"] = (report["inference"]["unpruned"]["median_seconds"]
                                                     / report["inference"]["pruned"]["median_seconds"])
        save()

    # 4. ALLoRA with LoRA-drop.
    allora_args = [*common, "lora.variant=allora", "lora.dropout=0", "lora.alpha=16"]
    allora_dir = run_part("allora", allora_args) if "allora" in args.parts else None
    if allora_dir is not None:
        report["allora"]["losses_finite"] = all(x == x and abs(x) != float("inf") for x in report["allora"]["losses"])
        report["allora"]["reloaded_max_abs_logit_diff"] = compare_reloaded_adapter(model_dir, allora_dir, device)
        save()

    # 5. The HF Trainer path on plain's settings.
    if "hf_trainer" in args.parts:
        hf_trainer(args, report, work, plain_args)
    report["total_s"] = time.perf_counter() - started
    save()
    print(json.dumps(report, indent=1)[:6000])
    ok = all(report.get(k, {}).get("exit") == 0 for k in args.parts)
    return 0 if ok else 1


def hf_trainer(args: argparse.Namespace, report: dict, work: Path, plain_args: list[str]) -> None:
    hf_out = work / "hf_trainer.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           "bench/hf_trainer_lora.py", "--out", str(hf_out), "--steps", str(args.steps),
           *[o for o in plain_args if not o.startswith(("train.max_steps", "train.save_probe_logits"))]]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420)
    report["hf_trainer"] = {"exit": proc.returncode, "seconds": time.perf_counter() - t}
    if proc.returncode != 0:
        report["hf_trainer"]["log_tail"] = (proc.stdout + proc.stderr)[-3000:]
    else:
        hf = json.loads(hf_out.read_text())
        report["hf_trainer"].update({k: hf[k] for k in ("median_step_s", "tokens_per_s_per_rank", "peak_memory_gib",
                                                        "trainable_params", "losses", "step_s")})
        if report.get("plain", {}).get("median_step_s"):
            # Both medians are over the second half of the steps.
            report["hf_trainer"]["cli_plain_speedup"] = report["hf_trainer"]["median_step_s"] / report["plain"][
                "median_step_s"]


if __name__ == "__main__":
    sys.exit(main())
