"""Will it fit? Memory estimates of a LoRA-drop run under DeepSpeed ZeRO-3, per GPU and per
node, from the model's config alone: no weights, no process group, no DeepSpeed engine.

Each figure is the sum of the tensors the run holds at its peak, one formula per row, and
each formula says where it comes from: a DeepSpeed 0.19.8 source file (``deepspeed/runtime/
zero/...``, read in this project's .venv), the transformers 5.x / peft 0.21 forward code, or
the activation-counting method of Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", its per-layer activation count: every tensor
autograd saves for the backward pass), applied to a LLaMA decoder layer with a frozen base and LoRA on it.
The per-layer activation count is checked in tests/test_planner.py against the tensors
autograd really saves on a tiny model.

Stages: the sampling stage has LoRA in every layer; the main stage has the kept layers' LoRA
plus one shared LoRA per module type. Which layers are kept is only known after sampling, so
the main stage is estimated for ``kept_fraction`` of the layers, by default 1.0: all kept,
the worst case (it then holds exactly the sampling stage's LoRA). The two stages never hold
memory at the same time: the sampling engine is released before the main one is built.

Everything is an estimate. What it does not count is listed in ``NOT_COUNTED``; the
allowances for what cannot be counted (CUDA context, allocator caching, the Python runtime)
are named constants below, each with its reason.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch

from .config import Config, ConfigError, ModelConfig
from .engine import SizeHints, load_ds_config
from .model import BUILTIN_PREFIX, ModelError, builtin_model_dir, decoder_layers, load_model_config, module_info
from .prune_algorithm import ATTN_MODULES, MLP_MODULES, exempt_layers
from .prune_zero3 import CHUNK_ELEMENTS
from .sizes import parse_size  # noqa: F401  (planner.parse_size: launch/plan.py --gpu-mem, --host-mem)

GiB = 1 << 30

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}

# Leave this fraction of the device (or of host RAM) free beyond the estimate: the estimate
# counts tensors, not the allocator's rounding or a kernel's scratch space.
SAFETY_MARGIN = 0.10

# CUDA context, cuBLAS workspaces and NCCL communicator buffers: memory that nvidia-smi shows
# but torch.cuda.memory_allocated() does not. About 0.5 GiB of context on an H100 with lazy
# module loading plus NCCL buffers for the data-parallel group; an assumption, not measured
# here (no GPU was available to this work).
CUDA_RUNTIME_BYTES = 1 * GiB

# PyTorch's caching allocator keeps freed blocks reserved, and ZeRO-3 gathers and frees
# buffers of a different size for every module, so the reserved peak (what nvidia-smi and
# the OOM limit see) exceeds the allocated peak. 10% of the tensor bytes is our assumption
# for that gap; the first thing to calibrate against torch.cuda.max_memory_reserved() on a GPU.
ALLOCATOR_RESERVE_FRACTION = 0.10

# Host RSS of one rank before any model tensor: the interpreter with torch, deepspeed,
# transformers, peft and datasets imported. Measured on the project's CPU machine
# (`python -c "import torch, deepspeed, transformers, peft, datasets"`: 0.45 GiB maximum
# RSS, torch 2.13.0+cpu). A CUDA build also maps the CUDA libraries and keeps host-side
# copies of kernels and pinned staging buffers: 3 GiB per GPU rank is our assumption.
HOST_RUNTIME_BYTES_CPU = int(0.45 * GiB)
HOST_RUNTIME_BYTES_GPU = 3 * GiB

NOT_COUNTED = (
    "the eval forward (no_grad, smaller than a training step)",
    "optimizer-step temporaries (activations are freed by then)",
    "rotary cos/sin tables and integer inputs (a few bytes per token)",
    "the init-time fp32 gradient buffer of stage3.initialize_optimizer_states (freed before training)",
)

# Public config.json values (huggingface.co/<id>/blob/main/config.json) of the models the
# recipes and the peft anchor name, used when the id is not in the local hub cache: the hub
# is often unreachable (and meta-llama repos are gated), and these values never change.
# Cross-checked: the parameter counts they give on the meta device are the published ones
# (Llama-2-7B 6,738,415,616; Llama-2-70B 68,976,648,192; Llama-3-70B 70,553,706,496).
# `torch_dtype` is the dtype of the stored weights (what rank 0 maps while loading).
_LLAMA2 = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "torch_dtype": "float16"}
_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
_LLAMA2_7B = {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32}
_LLAMA2_13B = {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
               "num_attention_heads": 40, "num_key_value_heads": 40}
_LLAMA2_70B = {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8}
_LLAMA3_8B = {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8}
_LLAMA3_70B = {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8}
KNOWN_MODEL_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-13b-hf": _LLAMA2_13B,
    "meta-llama/Llama-2-13b-chat-hf": _LLAMA2_13B,
    "meta-llama/Llama-2-70b-hf": _LLAMA2_70B,
    "meta-llama/Llama-2-70b-chat-hf": _LLAMA2_70B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-70B": _LLAMA3_70B,
    "meta-llama/Meta-Llama-3-70B-Instruct": _LLAMA3_70B,
    # HuggingFaceTB/SmolLM2-135M-Instruct, for the builtin before its first conversion; the
    # converted copy is stored in fp32 (loradrop_ds.model.prepare_builtin_model).
    "builtin:smollm2-135m-instruct": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "torch_dtype": "float32",
    },
}


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a causal LM, read from a weightless (meta-device) copy."""

    name: str
    source: str  # where the config came from
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    param_numels: tuple[int, ...]  # every parameter once: a tied embedding / lm_head counts once
    layer_param_numels: tuple[int, ...]  # the parameters of the largest decoder layer
    target_shapes: dict[str, tuple[int, int]]  # LoRA target module -> (in_features, out_features)
    largest_weight_numel: int  # the largest linear weight of a decoder layer (sizes ZeRO-3 buffers)
    checkpoint_dtype: Optional[str] = None  # dtype of the stored weights, when the config says

    @property
    def total_params(self) -> int:
        return sum(self.param_numels)


def shape_from_model(model: torch.nn.Module, target_modules: list[str], name: str = "", source: str = "",
                     checkpoint_dtype: Optional[str] = None) -> ModelShape:
    """Read a ModelShape off a (meta-device) causal LM. ``named_parameters`` yields a tied
    embedding / lm_head pair once (torch de-duplicates shared parameters), as ZeRO-3
    partitions and the checkpoint stores it once."""
    modules = module_info(model, target_modules)  # also checks the targets exist in every layer
    config = model.config
    layers = decoder_layers(model)
    largest_layer = max(layers, key=lambda layer: sum(p.numel() for p in layer.parameters()))
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    tied = out_emb is not None and out_emb.weight is in_emb.weight
    vocab = int(out_emb.weight.shape[0]) if out_emb is not None else int(config.vocab_size)
    return ModelShape(
        name=name, source=source, num_layers=modules.num_layers, hidden_size=modules.hidden_size,
        intermediate_size=int(getattr(config, "intermediate_size", 4 * modules.hidden_size)),
        num_heads=heads, num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim, vocab_size=vocab, tied_embeddings=tied,
        param_numels=tuple(p.numel() for p in model.parameters()),
        layer_param_numels=tuple(p.numel() for p in largest_layer.parameters()),
        target_shapes=dict(modules.shapes), largest_weight_numel=modules.largest_weight_numel,
        checkpoint_dtype=checkpoint_dtype,
    )


def _config_dtype(model_config: Any) -> Optional[str]:
    value = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if value is None:
        return None
    return str(value).removeprefix("torch.")


def read_model_config(model_cfg: ModelConfig) -> tuple[Any, str]:
    """The transformers config of ``model.path`` and where it came from, without reading
    weights or downloading anything a shipped copy can answer.

    Order: the converted builtin or a local directory (through ``load_model_config``); the
    local hub cache; the shipped public values (``KNOWN_MODEL_CONFIGS``); the hub itself
    (unknown ids only; a failure there is a ModelError naming the path).
    """
    from transformers import AutoConfig

    path = model_cfg.path
    if path.startswith(BUILTIN_PREFIX):
        if (builtin_model_dir(path[len(BUILTIN_PREFIX):]) / "config.json").is_file():
            return load_model_config(model_cfg), "converted builtin model"
    elif Path(path).is_dir():
        return load_model_config(model_cfg), f"local directory {path}"
    else:
        try:
            return (AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=model_cfg.trust_remote_code),
                    "local hub cache")
        except (OSError, ValueError):
            pass
    if path in KNOWN_MODEL_CONFIGS:
        values = dict(KNOWN_MODEL_CONFIGS[path])
        return AutoConfig.for_model(values.pop("model_type"), **values), "shipped copy of the public config.json"
    if path.startswith(BUILTIN_PREFIX):
        raise ModelError(f"model.path={path}: unknown builtin model; known: {sorted(KNOWN_MODEL_CONFIGS)}")
    return load_model_config(model_cfg), "hub"


def read_model_shape(model_cfg: ModelConfig, target_modules: list[str]) -> ModelShape:
    """Build the model on the meta device (no memory, no weights, a second or two for 70B)."""
    from transformers import AutoModelForCausalLM

    model_config, source = read_model_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=model_cfg.trust_remote_code)
    checkpoint_dtype = _config_dtype(model_config)
    if model_cfg.path.startswith(BUILTIN_PREFIX):
        checkpoint_dtype = "float32"  # prepare_builtin_model writes fp32 safetensors
    return shape_from_model(model, target_modules, model_cfg.path, source, checkpoint_dtype)


# --------------------------------------------------------------------------- the run


def _positive_int(zero: dict, keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        if key in zero:
            value = zero[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"zero_optimization.{key}={value!r}: expected a non-negative number "
                                  "(\"auto\" is filled only for the sizes loradrop_ds.engine.zero3_auto_values knows)")
            return int(value)
    return default


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
        )


@dataclass(frozen=True)
class RunSpec:
    """Everything an estimate depends on; ``spec_from_config`` fills it from a recipe."""

    model: ModelShape
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
    loradrop: bool = True  # false: plain LoRA, one stage
    kept_fraction: float = 1.0  # main stage: fraction of layers (or pairs) keeping their own LoRA
    train_shared: bool = True
    # LoRAPrune (prune.target_sparsity > 0): the layers it scores (not exempt) and the LoRA
    # target modules it scores; 0 and () without pruning.
    prune_layers: int = 0
    prune_modules: tuple[str, ...] = ()

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


def spec_from_config(cfg: Config, shape: ModelShape, world_size: int, gpus_per_node: int, device: str,
                     attn_implementation: Optional[str] = None, kept_fraction: float = 1.0) -> RunSpec:
    """A RunSpec from a validated recipe: the DeepSpeed config is read and its ``"auto"``
    sizes filled by loradrop_ds.engine (the same rules a run uses)."""
    if world_size < 1 or gpus_per_node < 1:
        raise ConfigError(f"world size {world_size} and GPUs per node {gpus_per_node} must be >= 1")
    if not 0.0 <= kept_fraction <= 1.0:
        raise ConfigError(f"kept fraction must be in [0, 1], got {kept_fraction}")
    modules = _as_module_info(shape)
    ds_config = load_ds_config(cfg, world_size, SizeHints.for_model(modules, cfg.lora.r))
    attn = attn_implementation or resolve_planned_attention(cfg.model.attn_implementation, device, cfg.model.dtype)
    prune_layers, prune_modules = 0, ()
    if cfg.prune.target_sparsity > 0:  # what loradrop_ds.prune_zero3.Pruner scores
        scored = (ATTN_MODULES if cfg.prune.heads else ()) + (MLP_MODULES if cfg.prune.channels else ())
        prune_modules = tuple(m for m in cfg.lora.target_modules if m in scored)
        prune_layers = shape.num_layers - len(exempt_layers(shape.num_layers, cfg.prune.exempt_first_fraction,
                                                            cfg.prune.exempt_last))
    return RunSpec(
        model=shape, world_size=world_size, gpus_per_node=min(gpus_per_node, world_size), device=device,
        dtype=cfg.model.dtype, lora_r=cfg.lora.r, lora_dropout=cfg.lora.dropout,
        target_modules=tuple(cfg.lora.target_modules), micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum, seq_len=cfg.data.max_seq_len, packing=cfg.data.packing,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        attn_implementation=attn, zero=ZeroSettings.from_ds_config(ds_config), loradrop=cfg.loradrop.enabled,
        kept_fraction=kept_fraction, train_shared=cfg.loradrop.train_shared,
        prune_layers=prune_layers, prune_modules=prune_modules,
    )


def _as_module_info(shape: ModelShape) -> Any:
    from .model import ModuleInfo

    return ModuleInfo(shape.num_layers, dict(shape.target_shapes), shape.hidden_size, shape.largest_weight_numel)


# --------------------------------------------------------------------------- ZeRO-3 rules


def partition_numel(numel: int, world_size: int) -> int:
    """One rank's share of a partitioned parameter: ceil(numel / world). ZeRO-3 pads each
    parameter to a multiple of the world size and gives every rank the same share
    (partition_parameters.py: ``_aligned_size``/``_padding_size``, ``_partition_param``:
    ``partition_size = tensor_size // world``)."""
    return -(-numel // world_size)


def is_persistent(numel: int, zero: ZeroSettings) -> bool:
    """Parameters at or below the persistence threshold are never partitioned away: each
    rank keeps the whole tensor (partition_parameters.py ``_convert_to_deepspeed_param``:
    ``ds_numel <= param_persistence_threshold``; model_persistence_threshold is unbounded by
    default)."""
    return numel <= zero.param_persistence_threshold


def zero3_param_bytes(numels: list[int] | tuple[int, ...], bytes_per: int, world_size: int, zero: ZeroSettings) -> int:
    """Resident bytes of one rank for parameters under ZeRO-3: every parameter's ceil(n / world)
    partition (``ds_tensor``), and a persistent one also whole (it is gathered once and never
    released: partitioned_param_coordinator.py skips ``ds_persist`` parameters)."""
    return sum((partition_numel(n, world_size) + (n if is_persistent(n, zero) else 0)) * bytes_per for n in numels)


def hpz_secondary_bytes(numels: list[int] | tuple[int, ...], bytes_per: int, world_size: int, zero: ZeroSettings) -> int:
    """hpZ (ZeRO++): a second partition of every partitioned parameter within a group of
    ``zero_hpz_partition_size`` ranks, so all-gathers stay inside a node
    (partition_parameters.py ``_partition_param_sec``: ``secondary_partition_size =
    aligned_size // num_ranks_in_param_group``, on the parameter's remote device)."""
    if zero.hpz_partition_size <= 1:
        return 0
    return sum(partition_numel(n, world_size) * world_size // zero.hpz_partition_size * bytes_per
               for n in numels if not is_persistent(n, zero))


def gathered_numel(spec: RunSpec) -> int:
    """Peak count of base elements gathered whole on a rank (partitioned_param_coordinator.py).

    * ``__params_to_release``: after a module runs, its parameters stay gathered when the
      trace reaches them again within ``max_reuse_distance`` elements. At the turn from
      forward to backward every parameter used in the last ``max_reuse_distance / 2``
      elements of the forward comes back within that distance (its backward use mirrors
      its forward one), so that many stay: the whole model when it is smaller.
    * The working layer: a decoder layer's weights are all gathered while its backward
      (after its recomputation, with checkpointing) runs.
    * ``fetch_sub_module`` prefetches at most ``prefetch_bucket_size`` elements and only
      while fewer than ``max_live_parameters`` are gathered.
    """
    zero = spec.zero
    partitioned = [n for n in spec.model.param_numels if not is_persistent(n, zero)]
    total = sum(partitioned)
    layer = sum(n for n in spec.model.layer_param_numels if not is_persistent(n, zero))
    held = min(total, zero.max_reuse_distance // 2)
    prefetch = min(zero.prefetch_bucket_size, max(0, zero.max_live_parameters - held - layer))
    return min(total, held + layer + prefetch)


# --------------------------------------------------------------------------- activations


def _mask_bytes_per_element(spec: RunSpec) -> int:
    """Bytes of a dropout mask element. On CUDA, dropout uses the fused ``native_dropout``
    kernel and saves a bool mask (ATen Dropout.cpp ``is_fused_kernel_acceptable``); on CPU
    it multiplies by a noise tensor of the input's dtype and saves that (``_dropout_impl``)."""
    return 1 if spec.device == "cuda" else DTYPE_BYTES[spec.lora_dtype]


# Inputs that several LoRA modules of a LLaMA layer share (when nothing copies them).
_SHARED_INPUT = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
                 "o_proj": "attention output", "gate_proj": "mlp input", "up_proj": "mlp input",
                 "down_proj": "mlp product"}


def lora_activation_bytes_per_token(spec: RunSpec) -> int:
    """Bytes per token that the LoRA modules of one layer save (peft lora.Linear.forward:
    ``lora_B(lora_A(dropout(x_cast))) * scaling``, where ``x_cast = x.to(lora_A.weight.dtype)``).

    A and B are trainable, so each saves its input: A the dropout output (or the cast input,
    without dropout), B the rank-r output of A. Dropout also saves its mask. Every module
    casts and drops out its own copy; only when there is neither a cast nor dropout do
    modules share their saved input, and then the attention output is the one flash/sdpa
    already saves.
    """
    a, lb = DTYPE_BYTES[spec.dtype], DTYPE_BYTES[spec.lora_dtype]
    total = 0
    shared_inputs: dict[str, int] = {}
    for module in spec.target_modules:
        in_features, _ = spec.model.target_shapes[module]
        total += spec.lora_r * lb  # A's output, saved by B
        if spec.lora_dropout > 0:
            total += (lb + _mask_bytes_per_element(spec)) * in_features
        elif lb != a:
            total += lb * in_features  # the cast copy, one per module
        else:
            shared_inputs[_SHARED_INPUT.get(module, module)] = a * in_features
    if spec.attn_implementation != "eager":
        shared_inputs.pop("attention output", None)  # the flash/sdpa output itself
    return total + sum(shared_inputs.values())


def layer_activation_bytes_per_token(spec: RunSpec) -> int:
    """Bytes per token one LLaMA decoder layer saves for backward, base frozen, LoRA on
    ``target_modules`` (Korthikanti et al. 2022's method; each term from the forward code).
    A frozen linear saves nothing for its own backward (its input gradient needs only the
    weight), so unlike the paper's 34 s b h the base matmuls' inputs do not appear.

    * RMSNorm x2 (LlamaRMSNorm.forward): the fp32 copy of the input, saved by ``pow`` and
      ``mul`` (4 h), and ``rsqrt`` per token (4).
    * Attention (flash-attn / sdpa): query, key, value, output and the fp32 log-sum-exp per
      head; no s x s matrix. sdpa and eager get a mask (every batch here has padding or
      packed position ids), so transformers repeats key/value to all heads
      (``use_gqa_in_sdpa`` needs mask None) and the float mask is saved (a * s per token).
      eager also saves the fp32 softmax and its cast: (4 + a) * heads * s per token.
    * SwiGLU MLP: ``silu`` saves its input, ``mul`` saves both factors: 3 a f.
    * LoRA: ``lora_activation_bytes_per_token``.
    """
    model, a = spec.model, DTYPE_BYTES[spec.dtype]
    h, f = model.hidden_size, model.intermediate_size
    q_width = model.num_heads * model.head_dim
    kv_width = model.num_kv_heads * model.head_dim if spec.attn_implementation == "flash_attention_2" else q_width
    norms = 2 * (4 * h + 4)
    attention = a * (2 * q_width + 2 * kv_width) + 4 * model.num_heads
    if spec.attn_implementation != "flash_attention_2":
        attention += a * spec.seq_len
    if spec.attn_implementation == "eager":
        attention += (4 + a) * model.num_heads * spec.seq_len
    mlp = 3 * a * f
    return norms + attention + mlp + lora_activation_bytes_per_token(spec)


def backward_workspace_bytes_per_token(spec: RunSpec) -> int:
    """Gradients alive at once while one layer's backward runs: in the SwiGLU MLP the
    gradients of the product, of silu(gate) and of up (3 a f), plus the LoRA branch's input
    gradient in the adapter dtype before it joins the base one (lb * widest LoRA input)."""
    a, lb = DTYPE_BYTES[spec.dtype], DTYPE_BYTES[spec.lora_dtype]
    widest = max(in_features for in_features, _ in spec.model.target_shapes.values())
    return 3 * a * spec.model.intermediate_size + lb * widest


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch at its peak, and the parts of that peak."""

    tokens: int
    stored_layers: int  # what the forward keeps per layer (all of it, or the checkpointed inputs)
    recomputed_layer: int  # one layer's saved tensors, rebuilt in backward (checkpointing only)
    workspace: int  # gradients of the layer being back-propagated
    head: int  # final norm + the logits the training loop holds through backward
    loss: int  # the fp32 loss: log-softmax output and its backward's gradients

    @property
    def peak(self) -> int:
        return self.stored_layers + self.head + max(self.loss, self.recomputed_layer + self.workspace)


def activation_estimate(spec: RunSpec, checkpointing: Optional[bool] = None) -> Activations:
    """Peak activation bytes of one micro-batch of ``micro_batch_size x seq_len`` tokens
    (with packing every row is full; without, rows pad to the longest in the batch, so this
    is an upper bound).

    * Without checkpointing every layer keeps its saved tensors to the end of the forward.
    * With (non-reentrant) checkpointing, torch.utils.checkpoint keeps only each layer's
      input hidden states (a h per token) and rebuilds one layer's tensors at a time in
      backward (Korthikanti et al. 2022: full recomputation stores 2 s b h bytes per layer
      in 16-bit).
    * Head: the final RMSNorm's fp32 copy (4 h) and the logits (a V), which the training
      loop holds through backward (``out = engine(**batch)`` in training.train_stage).
    * Loss (transformers loss_utils.ForCausalLMLoss): logits upcast to fp32, cross_entropy =
      log_softmax (saves its fp32 output, 4 V) + nll; its backward makes two fp32 gradients
      of that size: 12 V per token at the loss's backward, when every stored layer is alive.
    """
    ckpt = spec.gradient_checkpointing if checkpointing is None else checkpointing
    model, a, tokens = spec.model, DTYPE_BYTES[spec.dtype], spec.tokens_per_micro_batch
    layer = layer_activation_bytes_per_token(spec) * tokens
    mask = a * spec.seq_len * tokens if spec.attn_implementation != "flash_attention_2" else 0
    if ckpt:
        stored = model.num_layers * a * model.hidden_size * tokens + mask
        recomputed = layer
    else:
        stored, recomputed = model.num_layers * layer, 0
    head = (4 * model.hidden_size + 4) * tokens + a * model.vocab_size * tokens
    return Activations(tokens=tokens, stored_layers=stored, recomputed_layer=recomputed,
                       workspace=backward_workspace_bytes_per_token(spec) * tokens, head=head,
                       loss=12 * model.vocab_size * tokens)


# --------------------------------------------------------------------------- the estimate


def lora_matrix_numels(spec: RunSpec, stage: str) -> tuple[list[int], list[int]]:
    """(trainable, frozen) LoRA matrices of a stage, as numels: A is r x in, B is out x r.
    Sampling (and plain LoRA): every layer. Main: ``round(kept_fraction * L)`` layers keep
    their own, and the others share one LoRA per module type (frozen with train_shared=false)."""
    r, layers = spec.lora_r, spec.model.num_layers
    one_layer = [n for m in spec.target_modules
                 for n in (r * spec.model.target_shapes[m][0], spec.model.target_shapes[m][1] * r)]
    if stage == "sampling" or not spec.loradrop:
        return one_layer * layers, []
    kept = min(layers, max(0, round(spec.kept_fraction * layers)))
    shared = one_layer if kept < layers else []
    if spec.train_shared:
        return one_layer * kept + shared, []
    return one_layer * kept, shared


# weight_importance (loradrop_ds.prune_algorithm) on one row block: the float32 weight block, the three
# products that make G, G, B A, W + s B A and the product, of which at most this many are
# alive at once (an upper bound; the smaller r-sized operands are not counted).
PRUNE_SCRATCH_BLOCKS = 6


def prune_update_bytes(spec: RunSpec) -> int:
    """LoRAPrune's update-step buffers per GPU (``loradrop_ds.prune_zero3.Pruner``), an upper bound:
    per scored LoRA use, the fp32 weight gradients of A and B (``_grads``), the copies of A and
    B taken in the forward (``_weights``) and the flat all-reduce copy of the gradients, i.e.
    3 x 4 bytes x the uses' LoRA elements (per use: a shared LoRA counts in every layer that
    uses it), plus the importance scratch of one row block of the widest scored module
    (``importance_sums``). The base weight W an update gathers is one module, between steps,
    when the forward's gathered working set is released: inside that row."""
    if not spec.prune_layers or not spec.prune_modules:
        return 0
    r = spec.lora_r
    shapes = [spec.model.target_shapes[m] for m in spec.prune_modules]  # (in, out)
    per_layer = sum(r * n_in + n_out * r for n_in, n_out in shapes)
    block = max(min(max(1, CHUNK_ELEMENTS // n_in), n_out) * n_in for n_in, n_out in shapes)
    return 3 * 4 * per_layer * spec.prune_layers + PRUNE_SCRATCH_BLOCKS * 4 * block


@dataclass(frozen=True)
class StageEstimate:
    """Bytes of one stage: per GPU (or per rank on CPU) and per node of host RAM."""

    stage: str
    lora_params: int
    trainable_params: int
    device_rows: dict[str, int]  # per GPU, in the order printed; their sum is device_total
    activations_ckpt_on: int
    activations_ckpt_off: int
    host_rows: dict[str, int]  # per node (the node of global rank 0, which reads the checkpoint)
    host_reclaimable: int  # page cache while rank 0 maps the checkpoint: shown, not required

    @property
    def device_total(self) -> int:
        return sum(self.device_rows.values())

    @property
    def host_total(self) -> int:
        return sum(self.host_rows.values())


def stage_estimate(spec: RunSpec, stage: str) -> StageEstimate:
    """Bytes per GPU and per node for one stage (see the module docstring for the sources)."""
    zero, world, model = spec.zero, spec.world_size, spec.model
    a, lb = DTYPE_BYTES[spec.dtype], DTYPE_BYTES[spec.lora_dtype]
    grad_b = DTYPE_BYTES[zero.grad_accum_dtype or spec.dtype]
    comm_b = DTYPE_BYTES[zero.communication_data_type or spec.dtype]
    trainable, frozen_lora = lora_matrix_numels(spec, stage)
    all_lora = trainable + frozen_lora
    trainable_partitions = sum(partition_numel(n, world) for n in trainable)

    base = zero3_param_bytes(model.param_numels, a, world, zero)
    secondary = hpz_secondary_bytes(model.param_numels, a, world, zero)
    # LoRA: persistent matrices whole on every rank, plus every matrix's partition (the
    # trainable ones in the flat ``lp_param_buffer``, stage3.py
    # ``_create_fp16_partitions_with_defragmentation``).
    lora_resident = sum(n * lb for n in all_lora if is_persistent(n, zero))
    lora_partitions = sum(partition_numel(n, world) * lb for n in all_lora)
    base_partitions = sum(partition_numel(n, world) * a for n in model.param_numels)
    # Gradients: the flat partition buffer in the grad-accumulation dtype (stage3.py
    # ``_setup_for_real_optimizer``: ``grad_partitions_flat_buffer``; the model dtype unless
    # data_types.grad_accum_dtype says otherwise, engine.get_data_types) and the reduce
    # bucket in the communication dtype (``ipg_buckets``: ``reduce_bucket_size`` elements).
    # On CPU, untouched pages of that torch.empty cost no RAM: count only what gradients fill.
    bucket_elements = zero.reduce_bucket_size if spec.device == "cuda" else min(zero.reduce_bucket_size, sum(trainable))
    bucket = bucket_elements * comm_b if zero.contiguous_gradients else 0
    grads = trainable_partitions * grad_b + bucket
    # AdamW (torch, a client optimizer): exp_avg and exp_avg_sq in fp32 over the flat fp32
    # partition. stage3.py ``_create_fp32_partitions`` reuses the low-precision partition as
    # the fp32 master when it already is fp32 on the optimizer's device (fp32 LoRA, no
    # offload); otherwise (bf16 adapters, or either offload) it clones an fp32 master copy.
    master_needed = lb != 4 or zero.offload_param is not None or zero.offload_optimizer is not None
    optimizer = trainable_partitions * 4 * (2 + (1 if master_needed else 0))
    gathered = gathered_numel(spec) * a

    on = activation_estimate(spec, checkpointing=True).peak
    off = activation_estimate(spec, checkpointing=False).peak
    activations = on if spec.gradient_checkpointing else off

    device_rows = {"frozen base shard": base, "hpZ secondary shard": secondary, "gathered working set": gathered,
                   "LoRA parameters": lora_resident + lora_partitions, "LoRA gradients + reduce bucket": grads,
                   "AdamW state (fp32)": optimizer, "activations": activations}
    if spec.prune_layers:  # main stage only (0 in sampling: a row in every column of the table)
        # Counted on top of the activations (the gradients and copies fill during the backward
        # of an update step; the flat copy and scratch come after it): an upper bound.
        device_rows["LoRAPrune update buffers"] = prune_update_bytes(spec) if stage == "main" else 0
    offloaded = 0
    if zero.offload_param:
        # Partitions live in (pinned) host memory (partition_parameters.py ``_partition_param``:
        # ``device = self.remote_device``, except persistent parameters, which stay on the
        # device); the secondary hpZ partition too. Gathered copies still come to the GPU.
        offloaded += base_partitions + secondary + lora_partitions
        device_rows["frozen base shard"] = base - base_partitions
        device_rows["hpZ secondary shard"] = 0
        device_rows["LoRA parameters"] = lora_resident
    if zero.offload_optimizer:  # master, moments and grad partitions on the host; the bucket stays
        offloaded += optimizer + trainable_partitions * grad_b
        device_rows["AdamW state (fp32)"] = 0
        device_rows["LoRA gradients + reduce bucket"] = bucket
    if zero.offload_param == "nvme" or zero.offload_optimizer == "nvme":
        offloaded = 0  # on NVMe, not in RAM (its staging buffers are not counted)
    if spec.device == "cuda":
        tensors = sum(device_rows.values())
        device_rows["allocator reserve"] = int(ALLOCATOR_RESERVE_FRACTION * tensors)
        device_rows["CUDA context + NCCL"] = CUDA_RUNTIME_BYTES

    ranks = min(spec.gpus_per_node, world)
    if spec.device == "cuda":
        host_rows = {f"runtime, {ranks} ranks": ranks * HOST_RUNTIME_BYTES_GPU,
                     f"offloaded state, {ranks} ranks": ranks * offloaded}
    else:  # the "device" is host RAM: every rank's tensors are host memory
        host_rows = {f"runtime, {ranks} ranks": ranks * HOST_RUNTIME_BYTES_CPU,
                     f"rank tensors, {ranks} ranks": ranks * sum(device_rows.values())}
    # transformers modeling_utils (ZeRO-3 path of _load_pretrained_model): global rank 0 loads
    # every checkpoint file with map_location="cpu", the others "meta"; safetensors maps the
    # files, so the whole checkpoint passes through rank 0's page cache (reclaimable).
    checkpoint = model.total_params * DTYPE_BYTES.get(model.checkpoint_dtype or spec.dtype, a)
    return StageEstimate(stage=stage, lora_params=sum(all_lora), trainable_params=sum(trainable),
                         device_rows=device_rows, activations_ckpt_on=on, activations_ckpt_off=off,
                         host_rows=host_rows, host_reclaimable=checkpoint)


def stages_of(spec: RunSpec) -> list[str]:
    return ["sampling", "main"] if spec.loradrop else ["main"]


@dataclass(frozen=True)
class Plan:
    spec: RunSpec
    stages: list[StageEstimate]
    device_memory: Optional[int]  # bytes per GPU; None on CPU
    host_memory: Optional[int]  # bytes per node; None when unknown

    @property
    def peak_stage(self) -> StageEstimate:
        return max(self.stages, key=lambda s: (s.device_total, s.host_total))

    def usable(self, capacity: int) -> int:
        return int(capacity * (1 - SAFETY_MARGIN))

    @property
    def device_fits(self) -> bool:
        return self.device_memory is None or self.peak_stage.device_total <= self.usable(self.device_memory)

    @property
    def host_fits(self) -> bool:
        if self.host_memory is None:
            return True
        return max(s.host_total for s in self.stages) <= self.usable(self.host_memory)

    @property
    def fits(self) -> bool:
        return self.device_fits and self.host_fits


def estimate(spec: RunSpec, device_memory: Optional[int], host_memory: Optional[int]) -> Plan:
    return Plan(spec, [stage_estimate(spec, s) for s in stages_of(spec)], device_memory, host_memory)


def rank0_peak_rss_cpu(spec: RunSpec, stage: StageEstimate) -> int:
    """CPU runs: rank 0's peak resident set: the runtime, then the larger of training (its
    tensors) and loading (the mapped checkpoint plus its own shard, counted in RSS while mapped)."""
    loading = stage.host_reclaimable + stage.device_rows["frozen base shard"]
    return HOST_RUNTIME_BYTES_CPU + max(stage.device_total, loading)


# --------------------------------------------------------------------------- the check


def ranks_per_node(default: int) -> int:
    """This node's rank count as the launcher set it: torchrun's LOCAL_WORLD_SIZE, the
    deepspeed launcher's LOCAL_SIZE (deepspeed/launcher/launch.py), else ``default``."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return default


def host_memory_bytes() -> int:
    """This machine's physical memory, or its cgroup's limit when lower (containers)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def size(n: int) -> str:
    """GiB with one decimal, or MiB below 1 GiB (so small rows do not read as zero)."""
    return gib(n) if n >= GiB else f"{n / (1 << 20):.0f} MiB"


def _with(spec: RunSpec, **changes: Any) -> RunSpec:
    if "zero" in changes and isinstance(changes["zero"], dict):
        changes["zero"] = replace(spec.zero, **changes["zero"])
    return replace(spec, **changes)


def _fix(plan: Plan) -> Optional[list[str]]:
    """The first of the cumulative changes (checkpointing on; the micro-batch halved, with
    grad_accum raised to keep the global batch; parameter offload) whose estimate fits, as
    overrides, or None."""
    spec, overrides = plan.spec, {}

    def fits(candidate: RunSpec) -> bool:
        return estimate(candidate, plan.device_memory, plan.host_memory).fits

    if not spec.gradient_checkpointing:
        spec = _with(spec, gradient_checkpointing=True)
        overrides["model.gradient_checkpointing"] = "true"
        if fits(spec):
            return [f"{k}={v}" for k, v in overrides.items()]
    while spec.micro_batch_size > 1:
        micro = spec.micro_batch_size // 2
        spec = _with(spec, micro_batch_size=micro, grad_accum=-(-spec.grad_accum * spec.micro_batch_size // micro))
        overrides["train.micro_batch_size"], overrides["train.grad_accum"] = micro, spec.grad_accum
        if fits(spec):
            return [f"{k}={v}" for k, v in overrides.items()]
    if spec.device == "cuda" and spec.zero.offload_param is None:
        spec = _with(spec, zero={"offload_param": "cpu"})
        overrides["deepspeed"] = "ds_configs/zero3_offload_param.json"
        if fits(spec):
            return [f"{k}={v}" for k, v in overrides.items()]
    return None


def _gpus_needed(spec: RunSpec, device_memory: int, host_memory: Optional[int]) -> Optional[int]:
    """The smallest GPU count (whole nodes of ``gpus_per_node``, up to 1024) at which the
    current settings fit: more GPUs shrink the shards, not the activations."""
    for nodes in range(spec.nodes + 1, 1024 // spec.gpus_per_node + 1):
        if estimate(_with(spec, world_size=nodes * spec.gpus_per_node), device_memory, host_memory).fits:
            return nodes * spec.gpus_per_node
    return None


def explain_misfit(plan: Plan) -> str:
    """One line: what does not fit, by how much, what would, and how to skip the check."""
    spec, stage = plan.spec, plan.peak_stage
    top = sorted(((v, k) for k, v in stage.device_rows.items() if v > 0), reverse=True)[:3]
    parts = ", ".join(f"{k} {v / GiB:.1f}" for v, k in top)
    if not plan.device_fits:
        assert plan.device_memory is not None
        what = (f"the {stage.stage} stage needs about {gib(stage.device_total)} per GPU ({parts} GiB) but "
                f"{gib(plan.usable(plan.device_memory))} is usable ({gib(plan.device_memory)} less the "
                f"{SAFETY_MARGIN:.0%} margin)")
    else:
        assert plan.host_memory is not None
        host = max(plan.stages, key=lambda s: s.host_total)
        noun = "ranks on this machine" if spec.device == "cpu" else "ranks of a node"
        what = (f"the {spec.gpus_per_node} {noun} need about {gib(host.host_total)} of host RAM "
                f"({', '.join(f'{k} {v / GiB:.1f}' for k, v in host.host_rows.items() if v)} GiB) but "
                f"{gib(plan.usable(plan.host_memory))} is usable ({gib(plan.host_memory)} less the "
                f"{SAFETY_MARGIN:.0%} margin)")
    fixes = []
    overrides = _fix(plan)
    if overrides:
        fixes.append("it fits with " + " ".join(overrides))
    if spec.device == "cuda" and plan.device_memory is not None and not plan.device_fits:
        gpus = _gpus_needed(spec, plan.device_memory, plan.host_memory)
        if gpus:
            fixes.append(f"with {gpus} GPUs ({gpus // spec.gpus_per_node} nodes of {spec.gpus_per_node})")
    if not fixes:
        fixes.append("nothing tried fits (checkpointing, micro-batch 1"
                     + (", parameter offload, up to 1024 GPUs" if spec.device == "cuda" else "")
                     + "): lower data.max_seq_len or choose a smaller model")
    return f"memory check: {what}; " + ", or ".join(fixes) + "; train.skip_memory_check=true runs it anyway"


def plan_for_config(cfg: Config, world_size: int, gpus_per_node: int, device_memory_bytes: Optional[int],
                    host_memory_bytes: Optional[int], device: Optional[str] = None,
                    attn_implementation: Optional[str] = None, kept_fraction: float = 1.0,
                    shape: Optional[ModelShape] = None) -> Plan:
    """The estimate for a recipe. ``device`` defaults to cuda when a device memory is given,
    else cpu (where the device is host RAM)."""
    device = device or ("cuda" if device_memory_bytes is not None else "cpu")
    shape = shape or read_model_shape(cfg.model, cfg.lora.target_modules)
    spec = spec_from_config(cfg, shape, world_size, gpus_per_node, device, attn_implementation, kept_fraction)
    return estimate(spec, device_memory_bytes, host_memory_bytes)


def check_memory(cfg: Config, world_size: int, gpus_per_node: int, device_memory_bytes: Optional[int],
                 host_memory_bytes: Optional[int], attn_implementation: Optional[str] = None) -> Optional[str]:
    """None when the run's estimate fits with ``SAFETY_MARGIN`` to spare, else one line naming
    what does not fit and what to change (and ``train.skip_memory_check=true``).

    GPUs: pass each GPU's memory; host RAM is checked too when ``host_memory_bytes`` is given.
    CPU: pass ``device_memory_bytes=None``; then every rank's tensors are host RAM and the
    ranks of one machine (``gpus_per_node``) are checked together against it.
    Raises ConfigError / ModelError for a recipe or model that cannot be read.
    """
    plan = plan_for_config(cfg, world_size, gpus_per_node, device_memory_bytes, host_memory_bytes,
                           attn_implementation=attn_implementation)
    return None if plan.fits else explain_misfit(plan)


# --------------------------------------------------------------------------- the anchor

# The published figure the planner is checked against (issue 7): the peft docs' "Use PEFT
# and DeepSpeed with ZeRO3 for finetuning large models on multiple devices and multiple
# nodes" (huggingface/peft docs/source/accelerate/deepspeed.md; launch command
# examples/sft/run_peft_deepspeed.sh): "the memory consumed per GPU is 64 GB (80%)".
# 80% of an H100's 79.6 GiB is 63.7 GiB, so the figure is read as 64 GiB (64e9 bytes would
# be 75%); a screenshot of the GPU monitor, i.e. memory reserved, not just allocated.
PEFT_ANCHOR_BYTES = 64 * GiB


def peft_anchor_spec() -> RunSpec:
    """That run's settings, as the doc's command and configs give them: Llama-2-70b-hf,
    8 x H100 80GB on one node, accelerate's ZeRO-3 config (zero_stage 3, no offload, no
    stage3_* keys: DeepSpeed's defaults; no communication_data_type: the engine's bf16), bf16,
    LoRA r=8 (alpha 16) dropout 0.1 on all linear layers of the decoder ("all-linear" leaves
    out lm_head), max_seq_len 2048 packed, per-device batch 8, gradient checkpointing
    (use_reentrant False), flash-attn. Two details of its time: the ChatML special tokens
    grow the vocabulary to 32008 (examples/sft/utils.py: resize_token_embeddings(...,
    pad_to_multiple_of=8)), and the LoRA weights were bf16: DeepSpeed then cast the whole
    module with ``module.bfloat16()`` (engine._configure_distributed_model, "Replaces blanket
    module.half()/bfloat16()" in 0.19.8), and peft's fp32 ``autocast_adapter_dtype`` came later.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(KNOWN_MODEL_CONFIGS["meta-llama/Llama-2-70b-hf"], vocab_size=32008)
    model_config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    shape = shape_from_model(model, targets, "meta-llama/Llama-2-70b-hf (vocab 32008)",
                             "shipped copy of the public config.json", "float16")
    return RunSpec(model=shape, world_size=8, gpus_per_node=8, device="cuda", dtype="bfloat16", lora_r=8,
                   lora_dropout=0.1, target_modules=tuple(targets), micro_batch_size=8, seq_len=2048, grad_accum=4,
                   packing=True, gradient_checkpointing=True, attn_implementation="flash_attention_2",
                   zero=ZeroSettings(), lora_dtype="bfloat16", loradrop=False)


# --------------------------------------------------------------------------- the table


def format_plan(plan: Plan, recipe: str = "") -> str:
    """A readable table: one column per stage, rows per GPU and per node, totals, verdict."""
    spec, model = plan.spec, plan.spec.model
    cuda = spec.device == "cuda"
    unit = "GPU" if cuda else "rank"
    lines = [
        f"model    {model.name} ({model.source}): {model.total_params / 1e9:.2f}B parameters"
        f"{' (tied embeddings counted once)' if model.tied_embeddings else ''}, {model.num_layers} layers, "
        f"hidden {model.hidden_size}, vocab {model.vocab_size}",
        f"run      {recipe + ': ' if recipe else ''}{spec.world_size} {unit}s ({spec.nodes} node"
        f"{'s' if spec.nodes > 1 else ''} x {spec.gpus_per_node}), {spec.dtype} base, {spec.lora_dtype} LoRA r={spec.lora_r} "
        f"on {','.join(spec.target_modules)}, {spec.attn_implementation}",
        f"tokens   micro-batch {spec.micro_batch_size} x {spec.seq_len} = {spec.tokens_per_micro_batch} per {unit} "
        f"({'packed: rows full' if spec.packing else 'unpacked: upper bound, rows pad to the longest'}), "
        f"activation checkpointing {'on' if spec.gradient_checkpointing else 'off'}",
        f"zero-3   prefetch {spec.zero.prefetch_bucket_size:.3g}, persistence {spec.zero.param_persistence_threshold:.3g}, "
        f"max live {spec.zero.max_live_parameters:.3g}, reuse {spec.zero.max_reuse_distance:.3g}, "
        f"reduce bucket {spec.zero.reduce_bucket_size:.3g}"
        + (f", hpZ {spec.zero.hpz_partition_size}" if spec.zero.hpz_partition_size > 1 else "")
        + (f", offload param {spec.zero.offload_param}" if spec.zero.offload_param else "")
        + (f", offload optimizer {spec.zero.offload_optimizer}" if spec.zero.offload_optimizer else ""),
        "",
    ]
    names = {"sampling": "sampling (LoRA everywhere)",
             "main": ("main (plain LoRA)" if not spec.loradrop else
                      "main (all layers kept: worst case)" if spec.kept_fraction >= 1 else
                      f"main ({spec.kept_fraction:.0%} kept + shared)")}
    width = 44
    cols = [names[s.stage] for s in plan.stages]
    colw = max(14, *(len(c) for c in cols))

    def row(label: str, values: list[str]) -> str:
        return f"  {label:<{width}}" + "".join(f"{v:>{colw + 2}}" for v in values)

    lines.append(row(f"per {unit}", cols))
    lines.append(row("LoRA parameters (count)", [f"{s.lora_params:,}" for s in plan.stages]))
    for key in plan.stages[0].device_rows:
        if key == "hpZ secondary shard" and spec.zero.hpz_partition_size <= 1:
            continue
        label = key
        if key == "activations":
            label = f"activations (checkpointing {'on' if spec.gradient_checkpointing else 'off'})"
        lines.append(row(label, [size(s.device_rows[key]) for s in plan.stages]))
        if key == "activations":
            other = "off" if spec.gradient_checkpointing else "on"
            lines.append(row(f"  [with checkpointing {other}: not in total]",
                             [size(s.activations_ckpt_off if spec.gradient_checkpointing else s.activations_ckpt_on)
                              for s in plan.stages]))
    lines.append(row(f"total per {unit}", [size(s.device_total) for s in plan.stages]))
    if plan.device_memory is not None:
        lines.append(row(f"usable per {unit} ({gib(plan.device_memory)} - {SAFETY_MARGIN:.0%})",
                         [size(plan.usable(plan.device_memory))] * len(plan.stages)))
    lines.append("")
    lines.append(row("host RAM, node of rank 0" + (" (all ranks' tensors: CPU run)" if not cuda else ""),
                     [""] * len(plan.stages)))
    for key in plan.stages[0].host_rows:
        if any(s.host_rows[key] for s in plan.stages):
            lines.append(row(key, [size(s.host_rows[key]) for s in plan.stages]))
    lines.append(row("total per node", [size(s.host_total) for s in plan.stages]))
    lines.append(row("  [checkpoint mapped by rank 0: page cache]", [size(s.host_reclaimable) for s in plan.stages]))
    if plan.host_memory is not None:
        lines.append(row(f"usable per node ({gib(plan.host_memory)} - {SAFETY_MARGIN:.0%})",
                         [size(plan.usable(plan.host_memory))] * len(plan.stages)))
    lines.append("")
    peak = plan.peak_stage
    if not plan.fits:
        lines.append("verdict: does not fit: " + explain_misfit(plan).removeprefix("memory check: "))
    elif cuda:
        room = f"of {size(plan.usable(plan.device_memory))} usable" if plan.device_memory is not None else "(no GPU memory given)"
        lines.append(f"verdict: fits: the {peak.stage} stage needs {size(peak.device_total)} per GPU {room}")
    else:
        host = max(plan.stages, key=lambda s: s.host_total)
        room = f"of {size(plan.usable(plan.host_memory))} usable" if plan.host_memory is not None else "(no RAM size given)"
        lines.append(f"verdict: fits: the {host.stage} stage needs {size(host.host_total)} of host RAM for "
                     f"{spec.gpus_per_node} ranks {room} ({size(peak.device_total)} of tensors per rank)")
    lines.insert(-1, "not counted: " + "; ".join(NOT_COUNTED))
    return "\n".join(lines)
