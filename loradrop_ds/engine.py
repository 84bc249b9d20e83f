"""DeepSpeed engines: the config a recipe resolves and building an engine around a LoRA
model (tearing one down, which needs DeepSpeed internals, is in ``deepspeed_private``)."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .config import Config, ConfigError
from .model_dims import ModelDims


@dataclass
class SizeHints:
    """The three numbers that size ZeRO-3's buffers ("auto" values in a ds_config). A view of
    ``ModelDims`` and the LoRA rank (:meth:`for_model`), not a second record of the model: it
    stays because the largest LoRA matrix depends on the rank, which is no model dimension, and
    so that ``load_ds_config`` can be given hand-worked sizes (tests/test_engine.py)."""

    hidden_size: int
    largest_weight_numel: int  # the largest linear weight in a decoder layer (a 70B MLP weight: 2.35e8)
    largest_lora_numel: int  # the largest LoRA A or B matrix: r x max(in, out)

    @classmethod
    def for_model(cls, dims: ModelDims, lora_r: int) -> SizeHints:
        """From the model's dimensions (read on the meta device) and the LoRA rank."""
        largest_lora = lora_r * max(max(shape) for shape in dims.target_shapes.values())
        return cls(dims.hidden_size, dims.largest_weight_numel, largest_lora)


def zero3_auto_values(hints: SizeHints) -> dict[str, int]:
    """What ``"auto"`` means for the size-dependent ZeRO-3 settings.

    * ``reduce_bucket_size``: hidden^2, the HF integration's rule.
    * ``stage3_prefetch_bucket_size``: 0.9 hidden^2 (HF's rule), but at least the largest
      weight of a layer, so one MLP weight of a 70B model (2.35e8 elements, more than
      0.9 x 8192^2) fits in the bucket and prefetching looks ahead by whole weights.
    * ``stage3_param_persistence_threshold``: 10 x hidden (HF's rule), but at least the
      largest LoRA matrix, so every LoRA parameter (the shared LoRA, used by many layers,
      included) stays resident instead of being all-gathered at every use; measured 7%
      faster per main-stage step on CPU (bench/RESULTS.md). Base weights (k/v: at least
      hidden^2 / 8) stay partitioned.
    """
    h = hints.hidden_size
    return {
        "reduce_bucket_size": h * h,
        "stage3_prefetch_bucket_size": max(int(0.9 * h * h), hints.largest_weight_numel),
        "stage3_param_persistence_threshold": max(10 * h, hints.largest_lora_numel),
    }


def load_ds_config(cfg: Config, world_size: int, hints: SizeHints) -> dict:
    """Read ``cfg.deepspeed`` and fill its ``"auto"`` values from the recipe and the model.

    The recipe owns batch sizes, clipping and precision; a JSON value that contradicts
    the recipe is an error rather than a silent winner. Size-dependent ZeRO-3 values come
    from the model (:func:`zero3_auto_values`). Gradients are reduced in fp32 unless the
    JSON says otherwise: the trainable parameters are fp32 LoRA weights even on a bf16
    base, and DeepSpeed would otherwise reduce them in bf16 (``communication_data_type``
    defaults to the engine's half dtype, ``engine.py``, 0.19.8), losing precision on the
    shared LoRA whose gradient is a sum over many layers. For the same reason they are
    also accumulated and kept in fp32 (``data_types.grad_accum_dtype``): without it a bf16
    engine's ZeRO-3 optimizer casts the fp32-reduced gradient down to bf16 right after the
    reduce (``stage3.py`` ``__avg_scatter_grads``, ``gradient_accumulation_dtype`` from
    ``engine.get_data_types``: the model dtype unless set; 0.19.8).
    """
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise ConfigError(f"deepspeed={cfg.deepspeed}: no such file (see ds_configs/)")
    try:
        ds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"deepspeed={cfg.deepspeed}: not valid JSON ({e})") from e
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed={cfg.deepspeed}: expected a JSON object of settings, got {type(ds).__name__}")
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
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage != 3:
        raise ConfigError(f"deepspeed={cfg.deepspeed}: zero_optimization.stage is {stage}; this recipe is built "
                          "for ZeRO-3 (use ds_configs/zero3.json or a copy of it)")
    for key, value in zero3_auto_values(hints).items():
        if zero.get(key) == "auto":
            zero[key] = value
    ds.setdefault("communication_data_type", "fp32")
    if isinstance(ds.setdefault("data_types", {}), dict):
        ds["data_types"].setdefault("grad_accum_dtype", "fp32")
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


def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: Optional[int] = None) -> Any:
    """The one way this project gathers ZeRO-3 parameters whole: a context in which ``params``
    hold their full values (a collective: every rank enters it, in the same order). With
    ``modifier_rank`` that rank's changes are kept and sent to every rank's shard on exit. A
    no-op for parameters that are not partitioned (DeepSpeed 0.19.8's ``GatheredParameters``
    checks ``is_zero_param`` itself: partition_parameters.py), so callers need no test."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def create_engine(model: torch.nn.Module, ds_config: dict, lr: float, weight_decay: float,
                  lr_factor: Callable[[int], float]) -> Any:
    """A ZeRO-3 engine over the trainable parameters of ``model``.

    torch's AdamW is passed as a client optimizer: DeepSpeed's own would JIT-compile
    FusedAdam (CUDA) or CPUAdam, which buys nothing for the few LoRA parameters.
    """
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    # The shared LoRA's per-use gains (loradrop.shared_scale) start at 1: weight decay would
    # pull them towards 0, so they get none. The group exists only when there are gains.
    groups = [{"params": [p for n, p in named if "loradrop_gain" not in n]},
              {"params": [p for n, p in named if "loradrop_gain" in n], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine
