"""The run an estimate is for: the ZeRO-3 settings that size memory (read from the DeepSpeed
config, DeepSpeed's defaults for absent keys) and the ``RunSpec`` that ``spec_from_config``
fills from a validated recipe."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ..config import Config, ConfigError
from ..engine import SizeHints, load_ds_config
from ..model_dims import ModelDims
from ..prune_algorithm import ATTN_MODULES, MLP_MODULES, exempt_layers


def _positive_int(zero: dict, keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        if key in zero:
            value = zero[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"zero_optimization.{key}={value!r}: expected a non-negative number "
                                  "(\"auto\" is filled only for the sizes loradrop_ds.engine.zero3_auto_values knows)")
            return int(value)
    return default


def _bool(zero: dict, key: str, default: bool) -> bool:
    value = zero.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"zero_optimization.{key}={value!r}: expected true or false (\"auto\" is resolved from the "
                          "recipe and the world size first: loradrop_ds.engine.load_ds_config)")
    return value


def _offload_device(zero: dict, key: str) -> Optional[str]:
    section = zero.get(key) or {}
    device = section.get("device", "none") if isinstance(section, dict) else "none"
    return None if device in (None, "none") else str(device)


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO-3 settings that size memory. Absent keys take DeepSpeed's defaults
    (deepspeed/runtime/zero/config.py, DeepSpeedZeroConfig, 0.19.8)."""

    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    reduce_bucket_size: int = 500_000_000
    sub_group_size: int = 1_000_000_000
    hpz_partition_size: int = 1
    contiguous_gradients: bool = True  # allocates the reduce bucket (stage3 ``_setup_for_real_optimizer``)
    offload_param: Optional[str] = None  # "cpu" / "nvme" / None
    offload_optimizer: Optional[str] = None
    # None: the engine's default, its half dtype in a bf16 run (engine.communication_data_type)
    communication_data_type: Optional[str] = None
    # None: the model dtype (engine.get_data_types: grad_accum_dtype defaults to model_dtype)
    grad_accum_dtype: Optional[str] = None
    # zero.Init's replacement of F.linear, which saves every Linear's input (DeepSpeed's default: true)
    memory_efficient_linear: bool = True

    @classmethod
    def from_ds_config(cls, ds: dict) -> ZeroSettings:
        zero = ds.get("zero_optimization") or {}
        d = cls()
        return cls(
            prefetch_bucket_size=_positive_int(zero, ("stage3_prefetch_bucket_size", "prefetch_bucket_size"),
                                               d.prefetch_bucket_size),
            param_persistence_threshold=_positive_int(
                zero, ("stage3_param_persistence_threshold", "param_persistence_threshold"), d.param_persistence_threshold),
            max_live_parameters=_positive_int(zero, ("stage3_max_live_parameters", "max_live_parameters"),
                                              d.max_live_parameters),
            max_reuse_distance=_positive_int(zero, ("stage3_max_reuse_distance", "max_reuse_distance"),
                                             d.max_reuse_distance),
            reduce_bucket_size=_positive_int(zero, ("reduce_bucket_size",), d.reduce_bucket_size),
            sub_group_size=_positive_int(zero, ("sub_group_size",), d.sub_group_size),
            hpz_partition_size=max(1, _positive_int(zero, ("zero_hpz_partition_size",), 1)),
            contiguous_gradients=bool(zero.get("contiguous_gradients", d.contiguous_gradients)),
            offload_param=_offload_device(zero, "offload_param"),
            offload_optimizer=_offload_device(zero, "offload_optimizer"),
            communication_data_type=ds.get("communication_data_type"),
            grad_accum_dtype=(ds.get("data_types") or {}).get("grad_accum_dtype"),
            memory_efficient_linear=_bool(zero, "memory_efficient_linear", d.memory_efficient_linear),
        )


@dataclass(frozen=True)
class RunSpec:
    """Everything an estimate depends on; ``spec_from_config`` fills it from a recipe."""

    model: ModelDims
    world_size: int
    gpus_per_node: int  # ranks per node (on CPU: processes per machine)
    device: str  # "cuda" or "cpu"
    dtype: str  # the base model's dtype (model.dtype)
    lora_r: int
    lora_dropout: float
    target_modules: tuple[str, ...]
    micro_batch_size: int
    seq_len: int
    grad_accum: int
    packing: bool
    gradient_checkpointing: bool
    attn_implementation: str  # resolved: flash_attention_2, sdpa or eager
    zero: ZeroSettings = field(default_factory=ZeroSettings)
    # peft keeps adapters in fp32 on a half-precision base (autocast_adapter_dtype) and
    # DeepSpeed 0.19.8 leaves them fp32 on a ZeRO-Init model (ds_configs/README.md).
    lora_dtype: str = "float32"
    # lora.compute_dtype: the dtype the LoRA matmuls run in (None: the adapters' own, lora_dtype)
    lora_compute_dtype: Optional[str] = None
    # model.liger on CUDA: Liger's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy
    liger: bool = False
    loradrop: bool = True  # false: plain LoRA, one stage
    kept_fraction: float = 1.0  # main stage: fraction of layers (or pairs) keeping their own LoRA
    train_shared: bool = True
    # LoRAPrune (prune.target_sparsity > 0): the layers it scores (not exempt) and the LoRA
    # target modules it scores; 0 and () without pruning.
    prune_layers: int = 0
    prune_modules: tuple[str, ...] = ()

    @property
    def compute_dtype(self) -> str:
        return self.lora_compute_dtype or self.lora_dtype

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch_size * self.seq_len

    @property
    def nodes(self) -> int:
        return math.ceil(self.world_size / self.gpus_per_node)


def resolve_planned_attention(requested: str, device: str, dtype: str) -> str:
    """What ``model.attn_implementation=auto`` will pick on the target machine, assuming
    flash-attn is installed there (loradrop_ds.model.resolve_attn_implementation picks it
    on CUDA in half precision when it imports). Explicit values are taken as given."""
    if requested != "auto":
        return requested
    return "flash_attention_2" if device == "cuda" and dtype in ("bfloat16", "float16") else "sdpa"


def spec_from_config(cfg: Config, dims: ModelDims, world_size: int, gpus_per_node: int, device: str,
                     attn_implementation: Optional[str] = None, kept_fraction: float = 1.0) -> RunSpec:
    """A RunSpec from a validated recipe: the DeepSpeed config is read and its ``"auto"``
    sizes filled by loradrop_ds.engine (the same rules a run uses)."""
    if world_size < 1 or gpus_per_node < 1:
        raise ConfigError(f"world size {world_size} and GPUs per node {gpus_per_node} must be >= 1")
    if not 0.0 <= kept_fraction <= 1.0:
        raise ConfigError(f"kept fraction must be in [0, 1], got {kept_fraction}")
    # load_ds_config also resolves memory_efficient_linear's "auto" (engine.memory_efficient_linear_auto).
    ds_config = load_ds_config(cfg, world_size, SizeHints.for_model(dims, cfg.lora.r))
    attn = attn_implementation or resolve_planned_attention(cfg.model.attn_implementation, device, cfg.model.dtype)
    prune_layers, prune_modules = 0, ()
    if cfg.prune.target_sparsity > 0:  # what loradrop_ds.prune_zero3.Pruner scores
        scored = (ATTN_MODULES if cfg.prune.heads else ()) + (MLP_MODULES if cfg.prune.channels else ())
        prune_modules = tuple(m for m in cfg.lora.target_modules if m in scored)
        prune_layers = dims.num_layers - len(exempt_layers(dims.num_layers, cfg.prune.exempt_first_fraction,
                                                           cfg.prune.exempt_last))
    return RunSpec(
        model=dims, world_size=world_size, gpus_per_node=min(gpus_per_node, world_size), device=device,
        dtype=cfg.model.dtype, lora_r=cfg.lora.r, lora_dropout=cfg.lora.dropout,
        lora_compute_dtype=cfg.lora.compute_dtype, liger=cfg.model.liger and device == "cuda",
        target_modules=tuple(cfg.lora.target_modules), micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum, seq_len=cfg.data.max_seq_len, packing=cfg.data.packing,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        attn_implementation=attn, zero=ZeroSettings.from_ds_config(ds_config), loradrop=cfg.loradrop.enabled,
        kept_fraction=kept_fraction, train_shared=cfg.loradrop.train_shared,
        prune_layers=prune_layers, prune_modules=prune_modules,
    )
