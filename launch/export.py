#!/usr/bin/env python
"""Export a finished run or any checkpoint, on CPU, without DeepSpeed ranks.

    python launch/export.py RUN_OR_CHECKPOINT --out DIR [--format peft|compact|merged|pruned]
                            [--max-shard-size 5GB] [--base-model PATH] [--base-model-id OWNER/NAME]
                            [--push-to-hub REPO [--public]]

RUN_OR_CHECKPOINT is a run's output_dir (its final adapter/, or its newest complete
checkpoint if the run did not finish) or output_dir/checkpoints/<name>. --format pruned (a run
with a prune: section) removes LoRAPrune's pruned KV groups and MLP channels and merges the LoRA:
a smaller model for plain transformers, every layer at the widest layer's kept width (exempt
full-width layers limit the saving; see loradrop_ds/export/pruned.py). Every input is checked
before anything is written; a bad one is one "error:" line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from loradrop_ds.export import FORMATS, ExportError, export, push_to_hub
from loradrop_ds.model import ModelError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other user error (argparse prints usage too)
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run output_dir or checkpoint directory")
    parser.add_argument("--out", required=True, help="new (or empty) directory to write the export to")
    parser.add_argument("--format", default="peft", choices=FORMATS)
    parser.add_argument("--max-shard-size", default="5GB", help="merged, pruned: safetensors shard size (default 5GB)")
    parser.add_argument("--base-model", help="base model directory if not where the run read it (checked to match)")
    parser.add_argument("--base-model-id", metavar="OWNER/NAME",
                        help="the base model's Hub id, for the model card's base_model metadata (a builtin base "
                             "and a base read from the Hub are known; a local directory is not)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the export to this Hub model repository")
    parser.add_argument("--public", action="store_true", help="create the Hub repository public (default: private)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    out = export(args.source, args.out, args.format, base_model=args.base_model, max_shard_size=args.max_shard_size,
                 base_model_id=args.base_model_id)
    print(f"exported {args.source} as {args.format} to {out}")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=not args.public)
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ExportError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
