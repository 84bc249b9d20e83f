#!/usr/bin/env python
"""LoRAPrune at 20% and 50% sparsity against the same LoRA training without pruning (issue 10).

    .venv/bin/python bench/prune_bench.py [--steps 60] [--out bench/out/prune]
    .venv/bin/python bench/prune_bench.py --seed 2 --no-timing --out bench/out/prune_seed2 \
        --results bench/results/prune_seed2.json                 (another seed: quality only)
    .venv/bin/python bench/prune_bench.py --steps 120 --set prune.end_fraction=0.5 ...
        (a longer recovery: the last 60 of 120 steps at the final masks)

The embedded default task (SmolLM2-135M-Instruct, WordNet definition -> category, 2 ranks,
ZeRO-3) through the real CLI, plain LoRA r = 8 on all seven projections (loradrop.enabled=false,
so only pruning differs), seed 1 (``--seed``):

* ``lora``: no pruning (the reference);
* ``prune0.2``, ``prune0.5``: ``prune.target_sparsity`` 0.2 / 0.5 of each layer's KV groups and
  MLP channels, every 5 steps, cubic from 10% to 70% of the steps (the last 30% are recovery
  training at the final masks), no layer exempt (so the export is physically smaller).
  SmolLM2-135M has 3 KV groups per layer: 20% of 3 rounds down to none, 50% to one.

Each run is exported (``merged`` for the reference, ``pruned`` for the others) and the exports
are timed in plain transformers on CPU in one process, alternated: forward passes of 8 x 128
tokens, fp32, torch threads = 2 (run it on an otherwise idle machine: the timing shares the
cores). Reported: accuracy and eval loss after training (the masked model: the pruned one),
parameters, export size on disk, forward time and tokens/s, and the peak resident memory of a
fresh process that loads the model and runs one forward. Results: bench/results/prune.json. Resumable: a
run whose summary.json exists is not run again.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "lora": [],
    "prune0.2": ["prune.target_sparsity=0.2"],
    "prune0.5": ["prune.target_sparsity=0.5"],
}
COMMON = ["loradrop.enabled=false",
          "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
          "prune.every=5", "prune.end_fraction=0.7", "prune.exempt_first_fraction=0", "prune.exempt_last=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setting(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_reused(run_dir: Path, overrides: list[str]) -> None:
    """A finished run is reused only if its own config.yaml has every requested setting (a
    reused --out with another --seed, --steps or --set would otherwise be reported as if it
    had run with them)."""
    from loradrop_ds.config import load_config

    saved, wanted = load_config(run_dir / "config.yaml"), load_config(None, overrides)
    keys = dict.fromkeys(o.split("=", 1)[0] for o in overrides)
    differ = [k for k in keys if setting(saved, k) != setting(wanted, k)]
    if differ:
        raise SystemExit(f"{run_dir} finished with other settings ({', '.join(differ)}): use another --out")


def train(name: str, out: Path, steps: int, extra: list[str]) -> dict:
    run_dir = out / name
    overrides = [f"train.max_steps={steps}", *COMMON, *extra, *CONFIGS[name]]
    if (run_dir / "summary.json").exists():
        check_reused(run_dir, overrides)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "launch/train.py", f"output_dir={run_dir}", "resume=auto", "overwrite=true", *overrides]
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        with open(out / f"{name}.log", "a") as log:
            subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
        print(f"{name}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads((run_dir / "summary.json").read_text())


def export(name: str, out: Path) -> Path:
    target = out / f"{name}-export"
    if not (target / "config.json").exists():
        fmt = "merged" if name == "lora" else "pruned"
        subprocess.run([sys.executable, "launch/export.py", str(out / name), "--out", str(target), "--format", fmt],
                       cwd=REPO, check=True, capture_output=True)
    return target


PEAK_RSS_SNIPPET = """
import resource, sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    model(input_ids=torch.randint(0, model.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0)))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss_bytes(path: Path) -> int:
    """Peak resident memory of a fresh process that loads the model and runs one forward of
    8 x 128 tokens (the same interpreter and imports for every model, so differences are the
    model's)."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SNIPPET, str(path)], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout.strip().splitlines()[-1])


def time_models(exports: dict[str, Path], repeats: int, batches: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    results: dict = {}
    for name, path in exports.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        vocab = model.config.vocab_size
        results[name] = {"params": sum(p.numel() for p in model.parameters()),
                         "peak_rss_bytes": peak_rss_bytes(path),
                         "export_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
                         "config": {k: getattr(model.config, k) for k in
                                    ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")},
                         "seconds": []}
        del model
    inputs = [torch.randint(0, vocab, (8, 128), generator=gen) for _ in range(batches)]
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
              for name, path in exports.items()}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model(input_ids=inputs[0])
        for _ in range(repeats):  # alternated, so drift hits every model alike
            for name, model in models.items():
                start = time.perf_counter()
                for ids in inputs:
                    model(input_ids=ids)
                results[name]["seconds"].append(time.perf_counter() - start)
    for r in results.values():
        r["median_seconds"] = statistics.median(r["seconds"])
        r["tokens_per_s"] = batches * 8 * 128 / r["median_seconds"]
    return results


def summarize(files: list[Path]) -> None:
    reports = [json.loads(f.read_text()) for f in files]
    print("results: " + ", ".join(str(f) for f in files) + "\n")
    print("| run | seeds | accuracy % mean ± std (per seed) | eval loss mean ± std | accuracy vs lora, paired | "
          "eval loss vs lora, paired |")
    print("|---|---|---|---|---|---|")
    for name in CONFIGS:
        rs = [r["runs"][name] for r in reports if name in r["runs"]]
        base = [r["runs"]["lora"] for r in reports if name in r["runs"]]
        acc = [100 * r["eval_accuracy"] for r in rs]
        loss = [r["eval_loss"] for r in rs]
        d_acc = [a - 100 * b["eval_accuracy"] for a, b in zip(acc, base, strict=True)]
        d_loss = [x - b["eval_loss"] for x, b in zip(loss, base, strict=True)]
        acc_sd = f" ± {statistics.stdev(acc):.1f}" if len(acc) > 1 else ""
        loss_sd = f" ± {statistics.stdev(loss):.3f}" if len(loss) > 1 else ""
        print(f"| {name} | {len(rs)} | {statistics.fmean(acc):.1f}{acc_sd} ({' / '.join(f'{x:.1f}' for x in acc)}) "
              f"| {statistics.fmean(loss):.3f}{loss_sd} | {statistics.fmean(d_acc):+.1f} "
              f"({' / '.join(f'{x:+.1f}' for x in d_acc)}) | {statistics.fmean(d_loss):+.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "prune")
    parser.add_argument("--results", type=Path, default=None,
                        help="default bench/results/prune.json (with --no-timing: prune_seed<S>_steps<N>.json)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra dotted overrides for every run (e.g. prune.end_fraction=0.5)")
    parser.add_argument("--no-timing", action="store_true", help="train and evaluate only: no export, no timing")
    parser.add_argument("--summarize", nargs="+", type=Path, metavar="RESULTS",
                        help="only print accuracy and eval loss over these results files (one per seed): mean, "
                             "spread, and the differences to the unpruned run paired by seed")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return 0
    if args.results is None:  # the timed results are not overwritten by a quality-only run
        name = f"prune_seed{args.seed}_steps{args.steps}.json" if args.no_timing else "prune.json"
        args.results = REPO / "bench" / "results" / name
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [f"seed={args.seed}", *args.set]
    report: dict = {"command": "python bench/prune_bench.py " + " ".join(sys.argv[1:]), "common": COMMON,
                    "extra": extra, "steps": args.steps, "configs": CONFIGS, "runs": {}}
    for name in CONFIGS:
        summary = train(name, args.out, args.steps, extra)
        final = summary.get("final", {})
        report["runs"][name] = {"eval_accuracy": final.get("eval_accuracy"), "eval_loss": final.get("eval_loss"),
                                "zero_shot_accuracy": summary.get("zero_shot", {}).get("eval_accuracy"),
                                "trainable_params": summary.get("trainable_params"), "prune": summary.get("prune")}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.no_timing:
        args.results.write_text(json.dumps(report, indent=2))
        for name, r in report["runs"].items():
            removed = (r["prune"] or {}).get("base_params_removed", 0)
            print(f"{name:10} accuracy {r['eval_accuracy']}, eval loss {r['eval_loss']}, base parameters removed "
                  f"{removed:,}")
        return 0
    exports = {name: export(name, args.out) for name in CONFIGS}
    timing = time_models(exports, args.repeats, args.batches)
    for name, t in timing.items():
        report["runs"][name]["inference"] = t
    args.results.write_text(json.dumps(report, indent=2))
    base = timing["lora"]
    print(f"{'run':10} {'acc':>6} {'loss':>7} {'params':>11} {'export MB':>9} {'peak RSS MB':>11} {'s/batches':>9} "
          f"{'speed':>6}")
    for name, r in report["runs"].items():
        t = r["inference"]
        print(f"{name:10} {r['eval_accuracy']:6.1%} {r['eval_loss']:7.4f} {t['params']:11,} "
              f"{t['export_bytes'] / 1e6:9.1f} {t['peak_rss_bytes'] / 2**20:11.0f} {t['median_seconds']:9.3f} "
              f"{base['median_seconds'] / t['median_seconds']:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
