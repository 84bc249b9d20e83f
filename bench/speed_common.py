"""Shared set-up of bench/speed.py's torchrun workers (bench/speed_hooks_worker.py and
bench/hf_trainer_lora.py): the recipe, the process group, the builtin model and the
tokenised training set, built with the library's own helpers exactly as launch/train.py
builds them, so every worker sees the CLI's model, examples and ZeRO-3 config.

``LORADROP_REPO`` (set by bench/speed.py's ``--repo``) names the checkout whose
``loradrop_ds`` is imported; by default this one.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import warnings
from pathlib import Path
from typing import Any

REPO = Path(os.environ.get("LORADROP_REPO") or Path(__file__).resolve().parents[1]).resolve()
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                        category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)


def load_cfg(overrides: list[str]) -> Any:
    """The embedded default recipe with ``overrides`` (dotted.key=value), validated."""
    from loradrop_ds import config as config_lib
    from loradrop_ds.cli import resolve_shipped_paths

    cfg = config_lib.load_config(None, overrides)
    resolve_shipped_paths(cfg)
    return cfg


def prepare_inputs(cfg: Any, rank: int, local_rank: int, world_size: int) -> dict:
    """Model conversion (local rank 0, once per machine), tokenizer, the resolved ZeRO-3
    config (``load_ds_config``: the CLI's "auto" values) and the tokenised training set,
    as launch/train.py's setup does. The process group must exist."""
    import torch.distributed as dist

    from loradrop_ds import data as data_lib
    from loradrop_ds.engine import SizeHints, load_ds_config
    from loradrop_ds.model import (
        BUILTIN_PREFIX,
        cache_dir,
        load_tokenizer,
        prepare_builtin_model,
    )
    from loradrop_ds.model_dims import read_model_dims

    if cfg.model.path.startswith(BUILTIN_PREFIX) and local_rank == 0:
        prepare_builtin_model(cfg.model.path[len(BUILTIN_PREFIX):])
    dist.barrier()
    dims = read_model_dims(cfg.model, cfg.lora.target_modules)
    ds_config = load_ds_config(cfg, world_size, SizeHints.for_model(dims, cfg.lora.r))
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code)
    if local_rank == 0:
        data_lib.prepare_tokenized(cfg.data.train_file, "data.train_file", tokenizer, cfg.data, cache_dir(),
                                   build=True)
    dist.barrier()
    train_set, _ = data_lib.prepare_tokenized(cfg.data.train_file, "data.train_file", tokenizer, cfg.data,
                                              cache_dir(), build=False)
    if cfg.data.eval_split_ratio > 0 and not cfg.data.eval_file:
        train_rows, _ = data_lib.split_for_eval(len(train_set), cfg.data.eval_split_ratio, cfg.seed)
        train_set = train_set.subset(train_rows)
    return {"tokenizer": tokenizer, "ds_config": ds_config, "train_set": train_set, "modules": dims}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in a torch optimizer's ``state`` (AdamW: exp_avg, exp_avg_sq,
    and a scalar step). Under ZeRO-3 pass ``engine.optimizer.optimizer`` (the wrapped
    client optimizer, which holds this rank's fp32 partitions)."""
    import torch

    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def zero3_partition_numel(model: Any, world_size: int) -> int:
    """Elements of this rank's partition of the trainable parameters: sum over trainable
    parameters (each shared one once) of ceil(numel / world_size)."""
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            n = getattr(p, "ds_numel", p.numel())
            total += -(-n // world_size)
    return total


def write_json(path: str | Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
