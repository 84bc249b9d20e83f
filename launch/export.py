#!/usr/bin/env python
"""Export a finished run or any checkpoint, on CPU, without DeepSpeed ranks.

    python launch/export.py RUN_OR_CHECKPOINT --out DIR [--format peft|compact|merged]
                            [--max-shard-size 5GB] [--base-model PATH] [--push-to-hub REPO [--public]]

RUN_OR_CHECKPOINT is a run's output_dir (its final adapter/, or its newest complete
checkpoint if the run did not finish) or output_dir/checkpoints/<name>.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from loradrop_ds.export import FORMATS, ExportError, export, push_to_hub  # noqa: E402
from loradrop_ds.model import ModelError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run output_dir or checkpoint directory")
    parser.add_argument("--out", required=True, help="new (or empty) directory to write the export to")
    parser.add_argument("--format", default="peft", choices=FORMATS)
    parser.add_argument("--max-shard-size", default="5GB", help="merged: safetensors shard size (default 5GB)")
    parser.add_argument("--base-model", help="base model directory if not where the run read it (checked to match)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the export to this Hub model repository")
    parser.add_argument("--public", action="store_true", help="create the Hub repository public (default: private)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    out = export(args.source, args.out, args.format, base_model=args.base_model, max_shard_size=args.max_shard_size)
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
