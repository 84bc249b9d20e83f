"""Will it fit? Memory estimates of a LoRA-drop run under DeepSpeed ZeRO-3, per GPU and per
node, from the model's config alone: no weights, no process group, no DeepSpeed engine.

Each figure is the sum of the tensors the run holds at its peak, one formula per row, and
each formula says where it comes from: a DeepSpeed 0.19.8 source file (``deepspeed/runtime/
zero/...``, read in this project's .venv), the transformers 5.x / peft 0.21 forward code, or
the activation-counting method of Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", its per-layer activation count: every tensor
autograd saves for the backward pass), applied to a LLaMA decoder layer with a frozen base and LoRA on it,
as DeepSpeed runs it (its ``memory_efficient_linear`` saves every Linear's input).
The activation estimate is checked in tests/test_planner.py against one real ZeRO-3 training step
(zero.Init, peft, the engine) on a CPU rank: the tensors autograd saves and the allocator's peak;
docs/PLANNER.md has the tolerances, the numbers and the comparison with GPU runs.

Stages: the sampling stage has LoRA in every layer; the main stage has the kept layers' LoRA
plus one shared LoRA per module type. Which layers are kept is only known after sampling, so
the main stage is estimated for ``kept_fraction`` of the layers, by default 1.0: all kept,
the worst case (it then holds exactly the sampling stage's LoRA). The two stages never hold
memory at the same time: the sampling engine is released before the main one is built.

Everything is an estimate. What it does not count is listed in ``NOT_COUNTED``; the
allowances for what cannot be counted (CUDA context, allocator caching, the Python runtime)
are named constants in ``calibration``, each with its reason.

The modules, in the order each builds on the last:

* ``units``: bytes per element of each dtype name, GiB and its printing.
* ``loradrop_ds.model_dims`` (outside the package, shared with training): ``ModelDims`` read off a
  meta-device model; where the config comes from. Re-exported here.
* ``run_spec``: ``ZeroSettings`` (from the DeepSpeed config) and ``RunSpec`` (from a recipe).
* ``zero3_rules``: how ZeRO-3 partitions, persists and gathers parameters.
* ``activations``: the bytes a decoder layer saves for backward; the micro-batch's peak.
* ``calibration``: the allowances, ``NOT_COUNTED`` and the peft anchor the estimate is compared with.
* ``stage_estimate``: every row of a stage (``StageEstimate``) and the ``MemoryPlan`` of a run.
* ``memory_check``: the fit against a machine, the fix to suggest, ``check_memory``.
* ``table``: ``format_plan``, the table launch/plan.py prints.

The names below are the public API (``from loradrop_ds import planner; planner.X``);
``parse_size`` is the project's one size grammar (``loradrop_ds.sizes``), re-exported for
launch/plan.py's ``--gpu-mem`` and ``--host-mem``.
"""

from __future__ import annotations

from ..model_dims import KNOWN_MODEL_CONFIGS, ModelDims, dims_from_config, read_model_config, read_model_dims
from ..sizes import parse_size
from .activations import (
    LINEAR_INPUTS,
    Activations,
    activation_estimate,
    backward_workspace_bytes_per_token,
    head_saved_bytes_per_token,
    layer_activation_bytes_per_token,
    layer_saved_tensors,
    liger_loss_chunk_tokens,
    lora_activation_bytes_per_token,
    lora_weight_cast_bytes_per_layer,
)
from .calibration import (
    ALLOCATOR_RESERVE_FRACTION,
    CUDA_RUNTIME_BYTES,
    HOST_RUNTIME_BYTES_CPU,
    HOST_RUNTIME_BYTES_GPU,
    NOT_COUNTED,
    PEFT_ANCHOR_BYTES,
    SAFETY_MARGIN,
    peft_anchor_spec,
)
from .memory_check import check_memory, explain_misfit, host_memory_bytes, plan_for_config, ranks_per_node
from .run_spec import (
    RunSpec,
    ZeroSettings,
    resolve_planned_attention,
    spec_from_config,
)
from .stage_estimate import (
    PRUNE_SCRATCH_BLOCKS,
    MemoryPlan,
    StageEstimate,
    estimate,
    lora_matrix_numels,
    prune_update_bytes,
    rank0_peak_rss_cpu,
    stage_estimate,
    stages_of,
)
from .table import format_plan
from .units import DTYPE_BYTES, GiB, gib, size
from .zero3_rules import (
    gathered_numel,
    gathers_alias_partitions,
    hpz_secondary_bytes,
    is_persistent,
    offloaded_numel,
    partition_numel,
    zero3_param_bytes,
)

__all__ = [
    # units
    "DTYPE_BYTES", "GiB", "gib", "size", "parse_size",
    # model_dims
    "KNOWN_MODEL_CONFIGS", "ModelDims", "dims_from_config", "read_model_config", "read_model_dims",
    # run_spec
    "RunSpec", "ZeroSettings", "resolve_planned_attention", "spec_from_config",
    # zero3_rules
    "gathered_numel", "gathers_alias_partitions", "hpz_secondary_bytes", "is_persistent", "offloaded_numel",
    "partition_numel", "zero3_param_bytes",
    # activations
    "LINEAR_INPUTS", "Activations", "activation_estimate", "backward_workspace_bytes_per_token",
    "head_saved_bytes_per_token", "layer_activation_bytes_per_token", "layer_saved_tensors", "liger_loss_chunk_tokens",
    "lora_activation_bytes_per_token", "lora_weight_cast_bytes_per_layer",
    # calibration
    "ALLOCATOR_RESERVE_FRACTION", "CUDA_RUNTIME_BYTES", "HOST_RUNTIME_BYTES_CPU", "HOST_RUNTIME_BYTES_GPU",
    "NOT_COUNTED", "PEFT_ANCHOR_BYTES", "SAFETY_MARGIN", "peft_anchor_spec",
    # stage_estimate
    "PRUNE_SCRATCH_BLOCKS", "MemoryPlan", "StageEstimate", "estimate", "lora_matrix_numels", "prune_update_bytes",
    "rank0_peak_rss_cpu", "stage_estimate", "stages_of",
    # memory_check
    "check_memory", "explain_misfit", "host_memory_bytes", "plan_for_config", "ranks_per_node",
    # table
    "format_plan",
]
