#!/usr/bin/env python
"""Will it fit? Per-GPU and per-node memory of a recipe, before queueing it.

    python launch/plan.py --config recipes/llama3_70b_loradrop.yaml --nodes 1 --gpus-per-node 8 --gpu-mem 80GB
    python launch/plan.py --config recipes/default.yaml --cpu --gpus-per-node 2      (a CPU run: 2 ranks)
    python launch/plan.py --config RECIPE ... deepspeed=ds_configs/zero3_hpz.json train.micro_batch_size=2

Prints one column per stage (sampling: LoRA in every layer; main: kept + shared LoRA, all
layers kept unless --kept-fraction says otherwise), rows for each kind of memory, totals and
the bytes of a checkpoint on disk (per checkpoint and with train.keep_last), and a verdict.
Reads the model's config only (no weights; the recipes' hub models are known offline).
Exit code 0: fits; 1: does not fit; 2: bad input (one line on stderr).
Sizes: GB = 1e9 bytes, GiB = 2^30 (an "80 GB" H100 has 79.6 GiB; 80GB under-states it a little).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from loradrop_ds import planner
from loradrop_ds.cli import load_recipe
from loradrop_ds.config import ConfigError
from loradrop_ds.model import ModelError
from loradrop_ds.planner.checkpoint_bytes import format_checkpoint_bytes


class BadInput(ValueError):
    """Input the planner cannot use; printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage too
        raise BadInput(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (default: the embedded default recipe)")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node (default 8)")
    parser.add_argument("--gpu-mem", help="memory of one GPU, e.g. 80GB or 80GiB (required unless --cpu)")
    parser.add_argument("--host-mem", help="RAM of one node, e.g. 512GB (default: not checked; with --cpu: "
                                           "this machine's)")
    parser.add_argument("--cpu", action="store_true", help="plan a CPU run: every rank's tensors are host RAM")
    parser.add_argument("--kept-fraction", type=float, default=1.0,
                        help="main stage: fraction of layers that keep their own LoRA (default 1.0: all, the "
                             "worst case; LoRA-drop keeps about half)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value settings that override the recipe")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        args = parse_args(argv)
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise BadInput(f"--nodes {args.nodes} and --gpus-per-node {args.gpus_per_node} must be >= 1")
        if args.cpu:
            gpu_mem = None
            host_mem = planner.parse_size(args.host_mem) if args.host_mem else planner.host_memory_bytes()
        else:
            if not args.gpu_mem:
                raise BadInput("--gpu-mem is required for a GPU plan (e.g. --gpu-mem 80GB), or pass --cpu")
            gpu_mem = planner.parse_size(args.gpu_mem)
            host_mem = planner.parse_size(args.host_mem) if args.host_mem else None
        cfg, _ = load_recipe(args.config, args.overrides)  # as launch/train.py
        plan = planner.plan_for_config(cfg, args.nodes * args.gpus_per_node, args.gpus_per_node, gpu_mem, host_mem,
                                       device="cpu" if args.cpu else "cuda", kept_fraction=args.kept_fraction)
    except (BadInput, ConfigError, ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table, verdict = planner.format_plan(plan, args.config or "default recipe").rsplit("\n", 1)
    # The checkpoints' bytes on disk, before the verdict (the last line: the answer).
    print("\n".join([table, format_checkpoint_bytes(plan.spec, [s.stage for s in plan.stages], cfg.train.keep_last),
                     verdict]))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
