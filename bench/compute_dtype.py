#!/usr/bin/env python
"""``lora.compute_dtype``: the LoRA matmuls in fp32 (peft's default) against bf16, on a bf16 base.

    nice .venv/bin/python bench/compute_dtype.py [--variants loradrop allora loraprune] [--out DIR]
    .venv/bin/python bench/compute_dtype.py --report        (the table from what has finished)

The embedded default task (SmolLM2-135M-Instruct, WordNet definition -> category, 2 ranks,
ZeRO-3, the recipe's 10 sampling and 50 main-stage steps, all 320 eval examples) through the real
CLI, ``torchrun --nproc_per_node 2 launch/train.py``, with ``model.dtype=bfloat16`` and
``lora.compute_dtype`` float32, then bfloat16; nothing else differs, so both runs see the same
data in the same order. Variants (recipes): ``loradrop`` (recipes/default.yaml: kept LoRAs and
one tied shared LoRA per module, dropout 0.05), ``allora`` (recipes/smollm2_allora.yaml: ALLoRA's
hooks, LoRA-drop), ``loraprune`` (recipes/smollm2_loraprune.yaml: LoRAPrune's gradient taps at
50% sparsity, LoRA-drop). With ``--yardstick`` each variant also runs on an fp32 base
(``model.dtype=float32``, fp32 compute): how far the bf16 base alone moves the run.

Reported per variant, bf16 compute against fp32 compute: the same selection or not (and the
largest relative difference of the sampling stage's importance), the largest absolute
difference of the main-stage loss over the 50 steps (and over the 10 sampling steps), the
adapter's relative difference ``||a - b|| / ||a||`` (a: fp32 compute) over all of it, the kept
LoRAs and the tied shared LoRAs (each shared tensor once), final eval loss and accuracy of
both, the median main-stage seconds per step (CPU: bf16 matmuls, not a GPU prediction; the
machine is shared, so timings are rough), and whether the run is within the stated tolerance
(``LOSS_ATOL`` + ``LOSS_RTOL`` x loss at every step, ``ADAPTER_REL``, ``EVAL_LOSS_ATOL``; the
fp32-base yardstick is not expected to be). Results: bench/results/compute_dtype.json.
Resumable: a run whose summary.json exists is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"loradrop": "recipes/default.yaml", "allora": "recipes/smollm2_allora.yaml",
            "loraprune": "recipes/smollm2_loraprune.yaml"}
COMMON = ["model.dtype=bfloat16", "train.save_every=0", "resume=never"]
# The stated tolerance of bf16 against fp32 compute (docs/METHODS.md#precision-on-gpus): every
# logged loss within LOSS_ATOL + LOSS_RTOL x the fp32-compute loss, the adapter within ADAPTER_REL
# (||a - b|| / ||a||), the final eval loss within EVAL_LOSS_ATOL.
LOSS_ATOL, LOSS_RTOL, ADAPTER_REL, EVAL_LOSS_ATOL = 0.02, 0.01, 0.05, 0.01


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out_dir: Path, recipe: str, overrides: list[str]) -> None:
    if (out_dir / "summary.json").exists():
        print(f"done already: {out_dir}", flush=True)
        return
    if out_dir.exists():
        os.rename(out_dir, out_dir.with_name(f"{out_dir.name}.unfinished-{int(time.time())}"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "launch/train.py", "--config", recipe, f"output_dir={out_dir}", *overrides]
    print("$", shlex.join(cmd), flush=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(out_dir.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"  {time.time() - start:.0f} s", flush=True)


def losses(out_dir: Path, stage: str) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("stage") == stage and "loss" in r]


def step_seconds(out_dir: Path) -> float | None:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["seconds_per_step"] for r in records if r.get("stage") == "main" and "seconds_per_step" in r]
    return statistics.median(times[len(times) // 2:]) if times else None


def adapter_parts(out_dir: Path) -> dict[str, list]:
    """The adapter's tensors as ``{"kept": [...], "shared": [...]}``, each shared tensor once
    (the adapter writes the tied LoRA under every layer that uses it)."""
    from safetensors.torch import load_file

    from loradrop_ds.model import parse_layer_key

    weights = load_file(out_dir / "adapter" / "adapter_model.safetensors")
    selection_file = out_dir / "selection.json"
    shared_items = set(json.loads(selection_file.read_text())["shared"]) if selection_file.exists() else set()
    parts: dict[str, list] = {"kept": [], "shared": []}
    seen_shared = set()
    for name in sorted(weights):
        key = parse_layer_key(name.split(".lora_")[0])
        item_shared = str(key.layer) in shared_items or f"{key.layer}.{key.module}" in shared_items
        if not item_shared:
            parts["kept"].append((name, weights[name]))
            continue
        ab = name.split(".lora_")[1].split(".")[0]
        if (key.module, ab) not in seen_shared:
            seen_shared.add((key.module, ab))
            parts["shared"].append((name, weights[name]))
    return parts


def relative_difference(a: list, b: list) -> float | None:
    import torch

    if not a:
        return None
    names_a, names_b = [n for n, _ in a], [n for n, _ in b]
    if names_a != names_b:
        return None  # another selection: not the same tensors
    num = sum(float((x.double() - y.double()).pow(2).sum()) for (_, x), (_, y) in zip(a, b, strict=True))
    den = sum(float(x.double().pow(2).sum()) for _, x in a)
    return float(torch.tensor(num / den).sqrt())


def compare(ref: Path, other: Path) -> dict:
    """``other`` against ``ref`` (the fp32-compute run)."""
    out: dict = {}
    for stage in ("sampling", "main"):
        a, b = losses(ref, stage), losses(other, stage)
        if a:
            out[f"{stage}_steps"] = len(a)
            out[f"{stage}_max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(a, b, strict=True))
            out[f"{stage}_mean_loss_ref"] = statistics.fmean(a)
            out[f"{stage}_losses_within_tolerance"] = all(abs(x - y) <= LOSS_ATOL + LOSS_RTOL * abs(x)
                                                          for x, y in zip(a, b, strict=True))
    sel_a, sel_b = (json.loads((d / "selection.json").read_text()) if (d / "selection.json").exists() else None
                    for d in (ref, other))
    if sel_a is not None:
        out["same_selection"] = sorted(sel_a["kept"], key=str) == sorted(sel_b["kept"], key=str)
        out["kept"] = sel_a["kept_layers"]
        out["importance_max_rel_diff"] = max(abs(x - y) / x for x, y in zip(sel_a["importance"], sel_b["importance"],
                                                                            strict=True) if x > 0)
    pa, pb = adapter_parts(ref), adapter_parts(other)
    out["adapter_rel_diff"] = relative_difference(pa["kept"] + pa["shared"], pb["kept"] + pb["shared"])
    out["kept_rel_diff"] = relative_difference(pa["kept"], pb["kept"])
    out["shared_rel_diff"] = relative_difference(pa["shared"], pb["shared"])
    for name, d in (("ref", ref), ("other", other)):
        summary = json.loads((d / "summary.json").read_text())
        out[f"{name}_eval_loss"] = summary["final"]["eval_loss"]
        out[f"{name}_accuracy"] = summary["final"].get("eval_accuracy")
        out[f"{name}_s_per_step"] = step_seconds(d)
    out["within_tolerance"] = (all(out.get(f"{stage}_losses_within_tolerance", True) for stage in ("sampling", "main"))
                               and out["adapter_rel_diff"] is not None and out["adapter_rel_diff"] <= ADAPTER_REL
                               and abs(out["ref_eval_loss"] - out["other_eval_loss"]) <= EVAL_LOSS_ATOL)
    if (ref / "prune" / "masks.safetensors").exists():
        from safetensors.torch import load_file

        ma, mb = (load_file(d / "prune" / "masks.safetensors") for d in (ref, other))
        out["same_prune_masks"] = ma.keys() == mb.keys() and all(bool((ma[k] == mb[k]).all()) for k in ma)
        if ma.keys() == mb.keys():  # the share of mask entries (KV groups, MLP channels) decided otherwise
            out["prune_mask_diff_fraction"] = (sum(int((ma[k] != mb[k]).sum()) for k in ma)
                                               / sum(m.numel() for m in ma.values()))
    return out


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def report(results: dict) -> None:
    print("\n| variant | against | same selection | importance max rel. diff | max abs. loss diff, sampling / main "
          "| adapter rel. diff: all / kept / tied shared | eval loss fp32 -> other | accuracy fp32 -> other "
          "| s/step fp32 / other | within tolerance |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results["comparisons"].items():
        variant, against = name.split(":")
        same = {True: "yes", False: "**no**", None: "n/a"}[r.get("same_selection")]
        if "same_prune_masks" in r:
            same += "; prune masks: " + ("same" if r["same_prune_masks"] else
                                         f"**{100 * r.get('prune_mask_diff_fraction', float('nan')):.1f}% other**")
        print(f"| {variant} | {against} | {same} | {fmt(r.get('importance_max_rel_diff'), '.2e')} "
              f"| {fmt(r.get('sampling_max_abs_loss_diff'), '.4f')} / {fmt(r.get('main_max_abs_loss_diff'), '.4f')} "
              f"| {fmt(r['adapter_rel_diff'], '.4f')} / {fmt(r['kept_rel_diff'], '.4f')} / "
              f"{fmt(r['shared_rel_diff'], '.4f')} "
              f"| {r['ref_eval_loss']:.4f} -> {r['other_eval_loss']:.4f} "
              f"| {fmt(r['ref_accuracy'], '.4f')} -> {fmt(r['other_accuracy'], '.4f')} "
              f"| {fmt(r['ref_s_per_step'], '.2f')} / {fmt(r['other_s_per_step'], '.2f')} "
              f"| {'yes' if r['within_tolerance'] else '**no**'} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["loradrop", "allora", "loraprune"])
    parser.add_argument("--yardstick", action="store_true", help="also each variant on an fp32 base")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "compute_dtype")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "compute_dtype.json")
    parser.add_argument("--report", action="store_true", help="only print the table from --results")
    args = parser.parse_args(argv)
    if args.report:
        report(json.loads(args.results.read_text()))
        return
    sys.path.insert(0, str(REPO))
    results = json.loads(args.results.read_text()) if args.results.exists() else {"comparisons": {}}
    results["command"] = shlex.join(["python", "bench/compute_dtype.py", *(argv if argv is not None else sys.argv[1:])])
    for variant in args.variants:
        runs = {dtype: args.out / f"{variant}_{dtype}" for dtype in ("float32", "bfloat16")}
        for dtype, out_dir in runs.items():
            run(out_dir, VARIANTS[variant], [*COMMON, f"lora.compute_dtype={dtype}"])
        results["comparisons"][f"{variant}:bf16 compute"] = compare(runs["float32"], runs["bfloat16"])
        if args.yardstick:
            fp32_base = args.out / f"{variant}_fp32_base"
            run(fp32_base, VARIANTS[variant], ["model.dtype=float32", "train.save_every=0", "resume=never"])
            results["comparisons"][f"{variant}:fp32 base (yardstick)"] = compare(runs["float32"], fp32_base)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2))
    report(results)


if __name__ == "__main__":
    main()
