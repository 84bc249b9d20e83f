"""LoRAPrune's files: the names in a ``prune/`` directory (in the run directory and in every
checkpoint), their writing and their reading. Rank-free (no torch.distributed, no DeepSpeed):
training (:mod:`loradrop_ds.prune_zero3`) writes and resumes from them, the pruned export
(:mod:`loradrop_ds.export.pruned`) reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from .atomic import staged_dir
from .prune_algorithm import PruneState

PRUNE_DIR = "prune"  # inside the run directory and every checkpoint
STATE_FILE = "state.safetensors"  # PruneState: EMA scores, masks, update count
MASKS_FILE = "masks.safetensors"  # layers.{i}.attn / layers.{i}.mlp, uint8, 1 = kept (the export's input)
INFO_FILE = "prune.json"


def mask_key(layer: int, structure: str) -> str:
    """The key of one layer's mask (``attn``: KV groups, ``mlp``: channels) in MASKS_FILE."""
    return f"layers.{layer}.{structure}"


def write_prune_dir(directory: Path, state: PruneState, info: dict) -> list[Path]:
    """``directory/prune/``, atomically: the state (for resuming), the masks and prune.json (``info``; for the
    pruned export, which reads nothing else of LoRAPrune). Rank 0 only; returns the files."""
    from safetensors.torch import save_file

    out = Path(directory) / PRUNE_DIR
    with staged_dir(out) as tmp:  # whole or not at all, replacing an earlier one
        save_file(state.to_tensors(), tmp / STATE_FILE)
        masks = {mask_key(i, name): m.to(torch.uint8).contiguous()
                 for i, structures in state.masks.items() for name, m in structures.items()}
        save_file(masks, tmp / MASKS_FILE)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    return [out / STATE_FILE, out / MASKS_FILE, out / INFO_FILE]


def load_state(directory: Path) -> Optional[PruneState]:
    """The state ``directory/prune/`` holds to resume from, or None where there is none."""
    from safetensors.torch import load_file

    path = Path(directory) / PRUNE_DIR / STATE_FILE
    return PruneState.from_tensors(load_file(path)) if path.is_file() else None


def read_masks(path: Path) -> dict[str, torch.Tensor]:
    """MASKS_FILE's tensors, as written (keys :func:`mask_key`)."""
    from safetensors.torch import load_file

    return load_file(path)


def read_info(path: Path) -> Any:
    """INFO_FILE's JSON, as written (any JSON value: the caller checks its shape). Decoded from
    bytes, so a byte that is not UTF-8 raises a UnicodeDecodeError that holds the whole file."""
    return json.loads(path.read_bytes().decode("utf-8"))
