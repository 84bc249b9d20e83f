"""DeepSpeed engines: the config a recipe resolves, building an engine around a LoRA
model, and tearing it down without leaking the model."""

from __future__ import annotations

import copy
import gc
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .config import Config, ConfigError

# Per-module attributes DeepSpeed's ZeRO-3 registration leaves on every module and that
# engine.destroy() does not remove (parameter_offload.py, DeepSpeed 0.19.8). The two
# autograd Functions close over the old engine's offload object: a new engine on the same
# module would keep calling the old parameter coordinator in backward, because
# registration only creates them `if "pre_bwd_fn" not in module.__dict__`.
_ZERO3_MODULE_STATE = ("pre_bwd_fn", "post_bwd_fn", "applied_pre_backward_ref_cnt", "ds_grads_remaining")


@dataclass
class SizeHints:
    """Model dimensions that size ZeRO-3's buffers ("auto" values in a ds_config)."""

    hidden_size: int
    largest_weight_numel: int  # the largest linear weight in a decoder layer (a 70B MLP weight: 2.35e8)
    largest_lora_numel: int  # the largest LoRA A or B matrix: r x max(in, out)

    @classmethod
    def for_model(cls, modules: Any, lora_r: int) -> SizeHints:
        """From a ``model.ModuleInfo`` (read on the meta device) and the LoRA rank."""
        largest_lora = lora_r * max(max(shape) for shape in modules.shapes.values())
        return cls(modules.hidden_size, modules.largest_weight_numel, largest_lora)


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


def _lru_cache_of(fn: Any) -> Any:
    """The ``functools.lru_cache`` wrapper under ``fn``'s decorators. DeepSpeed's
    ``instrument_w_nvtx`` wraps without ``functools.wraps``, so the cache is found in the
    wrapper's closure rather than through ``__wrapped__``."""
    seen = set()
    while fn is not None and id(fn) not in seen and not hasattr(fn, "cache_clear"):
        seen.add(id(fn))
        inner = getattr(fn, "__wrapped__", None)
        if inner is None:
            cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
            inner = next((c for c in cells if callable(c)), None)
        fn = inner
    return fn if fn is not None and hasattr(fn, "cache_clear") else None


def _clear_release_cache() -> None:
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    cached = _lru_cache_of(getattr(PartitionedParameterCoordinator,
                                   "_PartitionedParameterCoordinator__params_to_release", None))
    if cached is not None:
        cached.cache_clear()


def forget_zero3_trace(engine: Any) -> None:
    """After evaluation: make ZeRO-3 record its module trace afresh at the next forward and
    drop the release decisions computed from the old one.

    DeepSpeed 0.19.8 keeps one trace per engine (``PartitionedParameterCoordinator``, reset
    at every forward by ``parameter_offload``'s ``_start_of_forward_hook``). An evaluation
    on a fresh engine (the zero-shot score of a plain-LoRA run, before its first step)
    records a forward-only trace; the first training backward invalidates it and a new
    one is recorded, but ``__params_to_release`` is an ``lru_cache`` keyed on (coordinator,
    module, step) that ``_invalidate_trace`` never clears, so the training steps go on
    using release decisions made for the forward-only trace: parameters are released and
    gathered again. Measured on 2 CPU ranks (SmolLM2-135M, plain LoRA): 3.64 s/step after
    a zero-shot eval against 2.96 without one (bench/RESULTS.md)."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None:
        return
    coordinator = offload.get_param_coordinator()
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()
    _clear_release_cache()


def release_engine(engine: Any, keep_model: bool = False) -> Optional[torch.nn.Module]:
    """Destroy an engine so that its model can be freed, or reused by a new engine.

    DeepSpeed 0.19.8's ``destroy()`` leaves two references behind: the root module in
    the module-level ``FWD_MODULE_STACK`` of ``parameter_offload``, and a class-level
    ``lru_cache`` on ``PartitionedParameterCoordinator.__params_to_release`` whose
    keys hold the coordinator (and through it every parameter). We clear both. The
    caller must drop its own references (engine, model, optimizer) as well.

    ``keep_model=True`` returns the model, still ZeRO-3 partitioned, ready for
    ``deepspeed.initialize`` again: every non-persistent parameter is first released
    back to its shard, and the per-module hook state and per-parameter optimizer link
    that ``destroy()`` leaves (see ``_ZERO3_MODULE_STATE``) are removed, so the old
    optimizer is freed now and the new engine registers its own hooks.
    """
    from deepspeed.runtime.zero import parameter_offload

    module = engine.module
    if keep_model:
        engine.empty_partition_cache()
    engine.destroy()
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not module]
    _clear_release_cache()
    if keep_model:
        for m in module.modules():
            for attr in _ZERO3_MODULE_STATE:
                m.__dict__.pop(attr, None)
        module.__dict__.pop("ds_inflight_param_registry", None)
        for p in module.parameters():
            # stage3.py `_link_all_hp_params` points every parameter, frozen ones included,
            # at the optimizer: left in place it keeps the old optimizer state (and the old
            # LoRA) alive until the next engine overwrites it.
            if hasattr(p, "_z3_optimizer"):
                del p._z3_optimizer
    else:
        module = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return module
