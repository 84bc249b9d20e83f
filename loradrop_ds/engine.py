"""DeepSpeed engines: the config a recipe resolves, building an engine around a LoRA
model, and tearing it down without leaking the model."""

from __future__ import annotations

import copy
import gc
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError


def load_ds_config(cfg: Config, world_size: int) -> dict:
    """Read ``cfg.deepspeed`` and fill its ``"auto"`` values from the recipe.

    The recipe owns batch sizes, clipping and precision; a JSON value that contradicts
    the recipe is an error rather than a silent winner.
    """
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise ConfigError(f"deepspeed={cfg.deepspeed}: no such file (see ds_configs/)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed={cfg.deepspeed}: not valid JSON ({e})") from e
    ds = copy.deepcopy(ds)
    t = cfg.train
    wanted = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
    }
    for key, value in wanted.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(f"deepspeed={cfg.deepspeed}: {key}={ds[key]} contradicts the recipe ({value}); "
                              f"set it to \"auto\" in the JSON and choose it in the recipe")
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        want = cfg.model.dtype == {"bf16": "bfloat16", "fp16": "float16"}[name]
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = want
        elif section["enabled"] != want:
            raise ConfigError(f"deepspeed={cfg.deepspeed}: {name}.enabled={section['enabled']} contradicts "
                              f"model.dtype={cfg.model.dtype}; set it to \"auto\"")
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"deepspeed={cfg.deepspeed}: remove the optimizer/scheduler sections; the recipe's "
                          "train.* settings build them (torch AdamW, warmup + schedule)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        raise ConfigError(f"deepspeed={cfg.deepspeed}: zero_optimization.stage is {stage}; this recipe is built "
                          "for ZeRO-3 (use ds_configs/zero3.json or a copy of it)")
    ds.setdefault("steps_per_print", 10**9)  # our own logging replaces DeepSpeed's
    return ds


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak LR after ``step`` optimizer steps: linear warmup, then
    cosine/linear decay to ``min_lr_ratio`` at ``total_steps``, or constant."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            decay = 1.0 - progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return factor


def create_engine(model: torch.nn.Module, ds_config: dict, lr: float, weight_decay: float,
                  lr_factor: Callable[[int], float]) -> Any:
    """A ZeRO-3 engine over the trainable parameters of ``model``.

    torch's AdamW is passed as a client optimizer: DeepSpeed's own would JIT-compile
    FusedAdam (CUDA) or CPUAdam, which buys nothing for the few LoRA parameters.
    """
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


def release_engine(engine: Any) -> None:
    """Destroy an engine so that its model can be freed.

    DeepSpeed 0.19.8's ``destroy()`` leaves two references behind: the root module in
    the module-level ``FWD_MODULE_STACK`` of ``parameter_offload``, and a class-level
    ``lru_cache`` on ``PartitionedParameterCoordinator.__params_to_release`` whose
    keys hold the coordinator (and through it every parameter). We clear both. The
    caller must drop its own references (engine, model, optimizer) as well.
    """
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    module = engine.module
    engine.destroy()
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not module]
    cached = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    while cached is not None and not hasattr(cached, "cache_clear"):
        cached = getattr(cached, "__wrapped__", None)
    if cached is not None:
        cached.cache_clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
