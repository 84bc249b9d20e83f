"""Checkpoint bytes on disk, per checkpoint and for ``train.keep_last``, from the LoRA matrices a
stage trains (``stage_estimate.lora_matrix_numels``) and the number of ranks.

A checkpoint (``run_checkpoint``; docs/CHECKPOINTS.md) holds:

* ``optimizer_state.safetensors`` (``training_state``): every trainable element's fp32 master
  value and its two AdamW moments, 12 bytes, once whatever the number of ranks; a shared
  LoRA counts once. Its header names 3 tensors per trainable matrix;
* ``adapter/``: the LoRA weights in their dtype (``RunSpec.lora_dtype``: fp32, as peft keeps
  adapters on any base; 2 bytes if they were bf16) as a PEFT adapter, every layer's: a
  shared LoRA is written under each layer that uses it, so the main stage's adapter is as
  large as the sampling stage's; plus ``adapter_config.json``;
* per rank: ``rng/rank<R>.pt`` (the CPU generator's state, and the GPU's on CUDA) and, in the
  sampling stage, ``stats/rank<R>.safetensors`` (three float64 ``[layers, modules]`` sums);
* ``optimizer_state.json`` (each trainable matrix's name and shape, the optimizer's
  scalars), ``state.json`` (the resolved config, the selection, results) and ``COMPLETE.json``
  (a line per file).

The tensor bytes are exact; the names, JSON and pickle framing are estimated from the
constants below (measured on this project's checkpoints, bench/checkpoint_bytes.py), and the
sum is checked against measured checkpoints of the tiny model in
tests/test_resume_world_size.py.

On disk: a new checkpoint is complete (written, then renamed into place) before the oldest
is pruned (``run_checkpoint.save_run_checkpoint``), so ``keep_last + 1`` checkpoints exist
while one is being written. The count is the largest stage's checkpoint times that: the
checkpoints kept may be of either stage.

Not counted: LoRAPrune's ``prune/`` directory (``prune.target_sparsity > 0``: scores and masks
of the pruned modules), the shared LoRA's per-use gains (``loradrop.shared_scale``: r or 1
elements per use) and the run's final ``adapter/`` beside the checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from .run_spec import RunSpec
from .units import DTYPE_BYTES

# A parameter's name as peft and the model give it, e.g.
# "base_model.model.model.layers.12.self_attn.q_proj.lora_A.default.weight" (72 characters).
NAME_BYTES = 72
# One safetensors header entry besides its name: {"dtype":"F32","shape":[n],"data_offsets":[a,b]}.
HEADER_ENTRY_BYTES = 64
# optimizer_state.json: the scalars (step, param group, scheduler state) and, per matrix, its shape.
SCALARS_BYTES = 700
SHAPE_ENTRY_BYTES = 14
# torch.save of the CPU generator's state (5,056 bytes) in its zip framing; CUDA adds its generator's.
RNG_FILE_BYTES = 6_600
RNG_CUDA_EXTRA_BYTES = 200
# stats/rank<R>.safetensors besides its three float64 [layers, modules] tensors: header and module names.
STATS_FRAMING_BYTES = 400
# adapter_config.json; state.json (the resolved config and results, plus the selection's per-layer
# sums and lists in the main stage, per layer and module); COMPLETE.json per file listed.
ADAPTER_CONFIG_BYTES = 1_200
STATE_JSON_BYTES = 4_000
STATE_JSON_PER_LAYER_MODULE_BYTES = 60
MANIFEST_PER_FILE_BYTES = 50


@dataclass(frozen=True)
class CheckpointBytes:
    """One checkpoint's bytes, by part."""

    optimizer_state: int  # optimizer_state.safetensors: fp32 master + 2 AdamW moments, once
    adapter: int  # adapter/: the LoRA weights in the LoRA dtype, every layer's
    per_rank: int  # rng (+ stats in the sampling stage) of one rank
    world_size: int
    small_files: int  # optimizer_state.json, state.json, COMPLETE.json

    @property
    def total(self) -> int:
        return self.optimizer_state + self.adapter + self.per_rank * self.world_size + self.small_files

    def on_disk(self, keep_last: int) -> int:
        """Bytes of the ``keep_last`` checkpoints kept plus the one being written."""
        return (keep_last + 1) * self.total


def checkpoint_bytes(trainable_numels: list[int], adapter_numels: list[int], lora_dtype_bytes: int, world_size: int,
                     sampling: bool, num_layers: int, num_modules: int, cuda: bool = False) -> CheckpointBytes:
    """A checkpoint of a stage training the matrices ``trainable_numels`` (a shared LoRA once)
    whose adapter holds ``adapter_numels`` (a shared LoRA under every layer using it)."""
    entry = NAME_BYTES + HEADER_ENTRY_BYTES
    optimizer_state = 8 + 12 * sum(trainable_numels) + 3 * len(trainable_numels) * (entry + 8)
    adapter = 8 + lora_dtype_bytes * sum(adapter_numels) + len(adapter_numels) * entry + ADAPTER_CONFIG_BYTES
    stats = 3 * 8 * num_layers * num_modules + STATS_FRAMING_BYTES if sampling else 0
    per_rank = RNG_FILE_BYTES + (RNG_CUDA_EXTRA_BYTES if cuda else 0) + stats
    files = 2 + 2 + 1 + world_size * (2 if sampling else 1)  # adapter, optimizer state, state.json, per rank
    small = (SCALARS_BYTES + len(trainable_numels) * (NAME_BYTES + SHAPE_ENTRY_BYTES) + STATE_JSON_BYTES
             + (0 if sampling else STATE_JSON_PER_LAYER_MODULE_BYTES * num_layers * num_modules)
             + MANIFEST_PER_FILE_BYTES * (files + 1))
    return CheckpointBytes(optimizer_state, adapter, per_rank, world_size, small)


def stage_checkpoint_bytes(spec: RunSpec, stage: str) -> CheckpointBytes:
    """A checkpoint of ``stage`` of the run ``spec`` plans (the main stage with
    ``spec.kept_fraction`` of the layers kept, all by default: the largest)."""
    from .stage_estimate import lora_matrix_numels

    trainable, _ = lora_matrix_numels(spec, stage)
    every_layer, _ = lora_matrix_numels(spec, "sampling")  # the adapter: every layer's LoRA
    return checkpoint_bytes(trainable, every_layer, DTYPE_BYTES[spec.lora_dtype], spec.world_size,
                            sampling=stage == "sampling", num_layers=spec.model.num_layers,
                            num_modules=len(spec.target_modules), cuda=spec.device == "cuda")


def format_checkpoint_bytes(spec: RunSpec, stages: list[str], keep_last: int) -> str:
    """The planner's lines on checkpoint bytes: per checkpoint of each stage, by part, and the
    most on disk with ``keep_last``."""
    from .units import size

    def mib(n: int) -> str:
        return size(n) if n >= 1 << 20 else f"{n / 1024:.0f} KiB"

    per_stage = {stage: stage_checkpoint_bytes(spec, stage) for stage in stages}
    lines = ["checkpoints (output_dir/checkpoints; docs/CHECKPOINTS.md)"]
    for stage, b in per_stage.items():
        lines.append(f"  {stage + ':':<10} {mib(b.total)} per checkpoint = optimizer state {mib(b.optimizer_state)} "
                     f"(fp32 LoRA + 2 AdamW moments, once) + adapter {mib(b.adapter)} + {b.world_size} ranks x "
                     f"{mib(b.per_rank)} + {mib(b.small_files)} of JSON")
    largest = max(b.total for b in per_stage.values())
    lines.append(f"  on disk:   up to {mib((keep_last + 1) * largest)} with train.keep_last={keep_last} ({keep_last + 1} "
                 "checkpoints while the newest is written, before the oldest is pruned)")
    return "\n".join(lines)
