"""DeepSpeed engines: the config a recipe resolves, the matmul precision a run trains at, and
building an engine around a LoRA model (tearing one down, which needs DeepSpeed internals, is
in ``deepspeed_private``)."""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .config import Config, ConfigError
from .model_dims import ModelDims

log = logging.getLogger(__name__)


@dataclass
class SizeHints:
    """The numbers that size ZeRO-3's buffers ("auto" values in a ds_config). A view of
    ``ModelDims`` and the LoRA rank (:meth:`for_model`), not a second record of the model: it
    stays because the largest LoRA matrix depends on the rank, which is no model dimension, and
    so that ``load_ds_config`` can be given hand-worked sizes (tests/test_engine.py)."""

    hidden_size: int
    largest_weight_numel: int  # the largest linear weight in a decoder layer (a 70B MLP weight: 2.35e8)
    largest_lora_numel: int  # the largest LoRA A or B matrix: r x max(in, out)
    largest_param_numel: int  # the largest parameter of the whole model (a 70B embedding: 1.05e9)

    @classmethod
    def for_model(cls, dims: ModelDims, lora_r: int) -> SizeHints:
        """From the model's dimensions (read on the meta device) and the LoRA rank."""
        largest_lora = lora_r * max(max(shape) for shape in dims.target_shapes.values())
        return cls(dims.hidden_size, dims.largest_weight_numel, largest_lora, max(dims.param_numels))


def params_offloaded(zero: dict) -> bool:
    """Whether ZeRO-3 keeps the parameters' partitions off the accelerator
    (``offload_param.device`` cpu or nvme; DeepSpeed's default is none)."""
    offload = zero.get("offload_param") or {}
    return isinstance(offload, dict) and offload.get("device", "none") in ("cpu", "nvme")


def zero3_auto_values(hints: SizeHints, world_size: int, offloaded: bool) -> dict[str, int]:
    """What ``"auto"`` means for the size-dependent ZeRO-3 settings.

    * ``reduce_bucket_size``: hidden^2, the HF integration's rule.
    * ``stage3_prefetch_bucket_size``: 0.9 hidden^2 (HF's rule), but at least the largest
      weight of a layer, so one MLP weight of a 70B model (2.35e8 elements, more than
      0.9 x 8192^2) fits in the bucket and prefetching looks ahead by whole weights.
    * ``stage3_param_persistence_threshold``, on several ranks: 10 x hidden (HF's rule), but
      at least the largest LoRA matrix, so every LoRA parameter (the shared LoRA, used by many
      layers, included) stays resident instead of being all-gathered at every use; measured 7%
      faster per main-stage step on CPU (bench/RESULTS.md). Base weights (k/v: at least
      hidden^2 / 8) stay partitioned: a resident base would be whole on every rank.
    * ``stage3_param_persistence_threshold``, on one rank with the parameters on the
      accelerator: the largest parameter of the model, so every parameter is persistent and
      ZeRO-3 never releases or fetches one again after the first use (its per-module
      gather/release work is gone). This costs no memory there: on one rank a parameter's
      partition is the whole tensor, and "gathering" it makes ``param.data`` a view of that
      partition (partition_parameters.py ``_no_gather_coalesced``/``NoGatherHandle``,
      DeepSpeed 0.19.8; ``.to(device)`` of a tensor already there is no copy). With
      ``offload_param`` the partition is in host memory and a persistent parameter would be
      copied to the accelerator for good, the whole model: the several-rank rule applies.
    """
    h = hints.hidden_size
    persistence = max(10 * h, hints.largest_lora_numel)
    if world_size == 1 and not offloaded:
        persistence = max(persistence, hints.largest_param_numel)
    return {
        "reduce_bucket_size": h * h,
        "stage3_prefetch_bucket_size": max(int(0.9 * h * h), hints.largest_weight_numel),
        "stage3_param_persistence_threshold": persistence,
    }


def memory_efficient_linear_auto(gradient_checkpointing: bool, world_size: int, offloaded: bool) -> bool:
    """What ``"auto"`` means for ``zero_optimization.memory_efficient_linear``: DeepSpeed's
    own linear only where torch's would hold released weights until backward.

    Read in DeepSpeed 0.19.8: with the setting on (DeepSpeed's default), ``zero.Init``
    replaces ``torch.nn.functional.linear`` for the rest of the process
    (partition_parameters.py ``_enable_mem_efficient_linear``) by ``zero3_linear_wrap``
    (runtime/zero/linear.py): an autograd Function that saves the weight *parameter* itself,
    whose storage ZeRO-3 swaps out when it releases it (``free_param``: ``param.data =
    torch.empty(0)``), and gathers it again in backward when it finds it released
    (``weight.all_gather()`` ... ``weight.partition()``). torch's ``F.linear`` saves the
    ``weight.t()`` view for backward, a tensor of its own that keeps the gathered storage
    alive after the release: every released weight of the forward stays gathered until its
    backward, the whole base on each rank. That does not happen:

    * with recomputation (``model.gradient_checkpointing``): a checkpointed layer saves
      nothing in its first forward, and its recomputation's saved weights are freed by its
      own backward right after;
    * on one rank with the parameters on the accelerator: a gathered parameter is a view of
      its partition, which stays anyway (see :func:`zero3_auto_values`); ``offload_param``
      gathers into accelerator copies, which would be held.

    There torch's linear is used: it saves the Python autograd Function per linear call
    (every base and LoRA matmul) and the gather in backward, and activation memory:
    DeepSpeed's Function saves every linear's input, frozen base ones included
    (``ctx.save_for_backward(input, weight, bias)``), where torch's saves the input only
    when the weight needs a gradient (checked in torch 2.13 with saved-tensor hooks: a
    frozen weight's linear saves just ``weight.t()``). Numerically the two are the same
    (``tests/test_tied_lora_zero3.py``)."""
    return not (gradient_checkpointing or (world_size == 1 and not offloaded))


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
    offloaded = params_offloaded(zero)
    for key, value in zero3_auto_values(hints, world_size, offloaded).items():
        if zero.get(key) == "auto":
            zero[key] = value
    linear = zero.get("memory_efficient_linear", "auto")
    if linear == "auto":
        zero["memory_efficient_linear"] = memory_efficient_linear_auto(cfg.model.gradient_checkpointing, world_size,
                                                                       offloaded)
    elif not isinstance(linear, bool):
        raise ConfigError(f"deepspeed={cfg.deepspeed}: zero_optimization.memory_efficient_linear={linear!r}; "
                          "use true, false or \"auto\"")
    _refuse_leaf_modules_with_shared_lora(cfg, zero)
    ds.setdefault("communication_data_type", "fp32")
    if isinstance(ds.setdefault("data_types", {}), dict):
        ds["data_types"].setdefault("grad_accum_dtype", "fp32")
    ds.setdefault("steps_per_print", 10**9)  # our own logging replaces DeepSpeed's
    return ds


def _refuse_leaf_modules_with_shared_lora(cfg: Config, zero: dict) -> None:
    """ZeRO-3 leaf modules and LoRA-drop's tied shared LoRA give the shared LoRA a zero gradient.

    Read in DeepSpeed 0.19.8: leaf modules come from ``zero_optimization.leaf_module``
    (engine.py ``_configure_distributed_model`` -> utils/z3_leaf_module.py
    ``apply_zero_leaf_module_config``) or ``stage3_module_granularity_threshold``
    (parameter_offload.py ``_set_z3_leaf_modules_by_threshold``). Registration files each
    parameter of a leaf module under it (parameter_offload.py ``_register_deepspeed_module``:
    ``param.ds_z3_leaf_module = module``), so a parameter shared by several layers ends up
    filed under the last one registered. stage3.py ``create_reduce_and_remove_grad_hooks``
    then gives leaf parameters no gradient hook of their own: a full-backward hook on that
    module hands their ``.grad`` to the reduce bucket when that layer's backward is done,
    zeros where there is none ("grads for MoE experts that didn't participate"). Autograd
    accumulates a parameter used in several layers once, after its last use's backward
    (one AccumulateGrad node, run when all its inputs are in), so at that moment the shared
    LoRA has no ``.grad``: zeros go into the bucket. The real gradient arrives later and is
    added into the bucket's copy if the bucket has not been reduced yet; once it has been
    (``reduce_bucket_size`` filled: the "auto" hidden^2 holds about 10 layers' LoRA
    gradients of SmolLM2 at r = 8 on q/k/v/o, 26 of Llama-3-70B at r = 16 on all seven
    modules), it lands in a ``.grad`` that nothing reduces and ``zero_grad`` drops: the shared
    LoRA trains on a zero gradient. Shown on 2 CPU ranks by tests/test_tied_lora_zero3.py
    (a bucket reduced between the uses: the optimizer's shared gradient is zero; the same run
    without leaf modules: right). The main stage ties a shared LoRA unless every layer is
    kept, so every LoRA-drop run refuses them; kept LoRAs (one module each) train correctly
    in leaf modules (the same test).

    Not covered: DeepSpeed's default leaf classes (leaf_module_config.py: the MoE blocks of
    Mixtral, Qwen2-MoE, Qwen3-MoE) apply without any setting; in transformers 5 only
    Qwen2-MoE's ``shared_expert`` projections are ``nn.Linear`` modules inside one, so a
    LoRA-drop run of Qwen2-MoE must not target them (gate_proj/up_proj/down_proj)."""
    if not cfg.loradrop.enabled:
        return
    granularity = zero.get("stage3_module_granularity_threshold", zero.get("module_granularity_threshold", 0))
    if "leaf_module" in zero or (isinstance(granularity, (int, float)) and granularity > 0):
        setting = "leaf_module" if "leaf_module" in zero else "stage3_module_granularity_threshold"
        raise ConfigError(f"deepspeed={cfg.deepspeed}: zero_optimization.{setting} makes DeepSpeed reduce the tied "
                          "shared LoRA's gradient before the layers using it have added their parts (it trains on "
                          "zeros); "
                          f"remove {setting} from the JSON, or train plain LoRA (loradrop.enabled=false)")


def set_matmul_precision(tf32: bool, device_type: str) -> None:
    """``train.tf32``: TF32 tensor cores for the fp32 matmuls that remain (the fp32 LoRA
    matmuls and anything else not in the base's dtype). Call once per process, before the
    model is built; every run sets it, on or off, so runs sharing a process (the tests) do
    not inherit it.

    ``torch.set_float32_matmul_precision("high")``, checked in torch 2.13: it sets the new
    API's ``torch.backends.cuda.matmul.fp32_precision`` to "tf32" and keeps the legacy
    ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.get_float32_matmul_precision()``
    readable. Setting only the new API (``...matmul.fp32_precision = "tf32"``, which the torch
    docs recommend since 2.9) makes both of those raise "you have used mix of the legacy and
    new APIs" (a RuntimeError from c10), and torch's own inductor reads
    ``get_float32_matmul_precision()`` (``_inductor/codecache.py``). The legacy
    ``allow_tf32 = True`` setters are announced for deprecation. Convolutions (cuDNN) are
    untouched: torch allows TF32 there by default and LLaMA has none.

    Not CUDA (the CPU test machines, where recipes are shared with GPU clusters): a no-op,
    with one log line when it was asked for."""
    if device_type != "cuda":
        if tf32:
            log.info("train.tf32 has no effect on %s: TF32 is a format of NVIDIA tensor cores", device_type)
        return
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


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
