"""The per-stage estimate: every tensor a stage holds at its peak, per GPU (or CPU rank) and
per node of host RAM (``StageEstimate``), and the ``MemoryPlan`` that puts the stages of a run
against the memory of a machine."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from ..prune_zero3 import CHUNK_ELEMENTS
from .activations import activation_estimate
from .calibration import (
    ALLOCATOR_RESERVE_FRACTION,
    CUDA_RUNTIME_BYTES,
    HOST_RUNTIME_BYTES_CPU,
    HOST_RUNTIME_BYTES_GPU,
    SAFETY_MARGIN,
)
from .run_spec import RunSpec
from .units import DTYPE_BYTES
from .zero3_rules import (
    gathered_numel,
    hpz_secondary_bytes,
    is_persistent,
    offloaded_numel,
    partition_numel,
    zero3_param_bytes,
)


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


ALLOCATOR_ROW, CUDA_RUNTIME_ROW = "allocator reserve", "CUDA context + NCCL"  # allowances, not tensors


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
    # the activations with LoRA computing in the other dtype (other_compute_dtype); None if there is none
    activations_other_compute: Optional[int] = None

    @property
    def device_total(self) -> int:
        return sum(self.device_rows.values())

    @property
    def tensor_bytes(self) -> int:
        """The tensors alone, without the allowances for the allocator and the CUDA runtime: what
        ``torch.cuda.max_memory_allocated`` measures (the figure a run logs beside its own peak)."""
        return self.device_total - self.device_rows.get(ALLOCATOR_ROW, 0) - self.device_rows.get(CUDA_RUNTIME_ROW, 0)

    @property
    def host_total(self) -> int:
        return sum(self.host_rows.values())


def other_compute_dtype(spec: RunSpec) -> Optional[str]:
    """The lora.compute_dtype a bf16 run could switch to (the table shows its activations too);
    None on an fp32 base, where LoRA computes in fp32 only."""
    if spec.dtype != "bfloat16":
        return None
    return "float32" if spec.compute_dtype == "bfloat16" else "bfloat16"


def stage_estimate(spec: RunSpec, stage: str) -> StageEstimate:
    """Bytes per GPU and per node for one stage (see the package docstring, loradrop_ds.planner, for the
    sources)."""
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
    lora_resident = 0 if world == 1 else sum(n * lb for n in all_lora if is_persistent(n, zero))
    lora_partitions = sum(partition_numel(n, world) * lb for n in all_lora)
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
    other_compute = other_compute_dtype(spec)
    activations_other_compute = (activation_estimate(replace(spec, lora_compute_dtype=other_compute)).peak
                                 if other_compute else None)

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
        base_offloaded = offloaded_numel(model.param_numels, world, zero) * a
        lora_offloaded = offloaded_numel(all_lora, world, zero) * lb
        offloaded += base_offloaded + secondary + lora_offloaded
        device_rows["frozen base shard"] = base - base_offloaded
        device_rows["hpZ secondary shard"] = 0
        device_rows["LoRA parameters"] = lora_resident + lora_partitions - lora_offloaded
    if zero.offload_optimizer:  # master, moments and grad partitions on the host; the bucket stays
        offloaded += optimizer + trainable_partitions * grad_b
        device_rows["AdamW state (fp32)"] = 0
        device_rows["LoRA gradients + reduce bucket"] = bucket
    if zero.offload_param == "nvme" or zero.offload_optimizer == "nvme":
        offloaded = 0  # on NVMe, not in RAM (its staging buffers are not counted)
    if spec.device == "cuda":
        tensors = sum(device_rows.values())
        device_rows[ALLOCATOR_ROW] = int(ALLOCATOR_RESERVE_FRACTION * tensors)
        device_rows[CUDA_RUNTIME_ROW] = CUDA_RUNTIME_BYTES

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
                         host_rows=host_rows, host_reclaimable=checkpoint,
                         activations_other_compute=activations_other_compute)


def stages_of(spec: RunSpec) -> list[str]:
    return ["sampling", "main"] if spec.loradrop else ["main"]


@dataclass(frozen=True)
class MemoryPlan:
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


def estimate(spec: RunSpec, device_memory: Optional[int], host_memory: Optional[int]) -> MemoryPlan:
    return MemoryPlan(spec, [stage_estimate(spec, s) for s in stages_of(spec)], device_memory, host_memory)


def rank0_peak_rss_cpu(spec: RunSpec, stage: StageEstimate) -> int:
    """CPU runs: rank 0's peak resident set: the runtime, then the larger of training (its
    tensors) and loading (the mapped checkpoint plus its own shard, counted in RSS while mapped)."""
    loading = stage.host_reclaimable + stage.device_rows["frozen base shard"]
    return HOST_RUNTIME_BYTES_CPU + max(stage.device_total, loading)
