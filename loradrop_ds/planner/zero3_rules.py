"""How DeepSpeed ZeRO-3 (0.19.8, ``deepspeed/runtime/zero/``) holds parameters on a rank:
partitions, persistent parameters, the hpZ secondary partition and the gathered working set."""

from __future__ import annotations

from .run_spec import RunSpec, ZeroSettings


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


def gathers_alias_partitions(world_size: int, zero: ZeroSettings) -> bool:
    """On one rank a "gathered" parameter is its partition: partition_parameters.py
    ``_no_gather_coalesced`` (taken when every parameter's partition world is 1) sets
    ``param.data = param.ds_tensor.data.to(device)``, which copies nothing when the partition
    already is on the device, i.e. unless parameters are offloaded (a persistent parameter's
    partition stays on the device even then: ``offloaded_numel``)."""
    return world_size == 1 and zero.offload_param is None


def zero3_param_bytes(numels: list[int] | tuple[int, ...], bytes_per: int, world_size: int, zero: ZeroSettings) -> int:
    """Resident bytes of one rank for parameters under ZeRO-3: every parameter's ceil(n / world)
    partition (``ds_tensor``), and a persistent one also whole (it is gathered once and never
    released: partitioned_param_coordinator.py skips ``ds_persist`` parameters), except on one
    rank, where the whole is the partition itself (``gathers_alias_partitions``; with offload too,
    as a persistent partition is on the device)."""
    return sum((partition_numel(n, world_size) + (n if world_size > 1 and is_persistent(n, zero) else 0)) * bytes_per
               for n in numels)


def offloaded_numel(numels: list[int] | tuple[int, ...], world_size: int, zero: ZeroSettings) -> int:
    """With ``offload_param``: the partition elements that live in host memory, every partition but
    a persistent parameter's (partition_parameters.py ``_partition_param``: ``if param.ds_persist:
    device = self.local_device``, else the remote device)."""
    return sum(partition_numel(n, world_size) for n in numels if not is_persistent(n, zero))


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
    * Without ``memory_efficient_linear`` and without checkpointing, autograd holds every
      gathered frozen weight until its backward (torch's mm saves the weight's transpose, a view
      of the gathered buffer; measured once on 2 CPU ranks with ``stage3_max_reuse_distance`` 0,
      docs/PLANNER.md): all of them.
    * On one rank nothing is gathered (``gathers_alias_partitions``).
    """
    zero = spec.zero
    if gathers_alias_partitions(spec.world_size, zero):
        return 0
    partitioned = [n for n in spec.model.param_numels if not is_persistent(n, zero)]
    total = sum(partitioned)
    if not zero.memory_efficient_linear and not spec.gradient_checkpointing:
        # torch's linear saves the frozen weight (a view of its gathered buffer) for the input
        # gradient, so every gathered weight stays until its backward: the whole model at the turn.
        return total
    layer = sum(n for n in spec.model.layer_param_numels if not is_persistent(n, zero))
    held = min(total, zero.max_reuse_distance // 2)
    prefetch = min(zero.prefetch_bucket_size, max(0, zero.max_live_parameters - held - layer))
    return min(total, held + layer + prefetch)
