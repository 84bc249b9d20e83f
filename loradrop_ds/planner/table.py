"""The plan as a readable table: one column per stage, rows per GPU and per node, totals, verdict."""

from __future__ import annotations

from .calibration import NOT_COUNTED, SAFETY_MARGIN
from .memory_check import explain_misfit
from .stage_estimate import MemoryPlan, other_compute_dtype
from .units import gib, size


def format_plan(plan: MemoryPlan, recipe: str = "") -> str:
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
        f"on {','.join(spec.target_modules)} computing in {spec.compute_dtype}, {spec.attn_implementation}"
        + (", Liger kernels" if spec.liger else ""),
        f"tokens   micro-batch {spec.micro_batch_size} x {spec.seq_len} = {spec.tokens_per_micro_batch} per {unit} "
        f"({'packed: rows full' if spec.packing else 'unpacked: upper bound, rows pad to the longest'}), "
        f"activation checkpointing {'on' if spec.gradient_checkpointing else 'off'}",
        f"zero-3   prefetch {spec.zero.prefetch_bucket_size:.3g}, persistence {spec.zero.param_persistence_threshold:.3g}, "
        f"max live {spec.zero.max_live_parameters:.3g}, reuse {spec.zero.max_reuse_distance:.3g}, "
        f"reduce bucket {spec.zero.reduce_bucket_size:.3g}, "
        f"{'DeepSpeed' if spec.zero.memory_efficient_linear else 'torch'}'s linear (memory_efficient_linear="
        f"{str(spec.zero.memory_efficient_linear).lower()})"
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
            if plan.stages[0].activations_other_compute is not None:
                lines.append(row(f"  [lora.compute_dtype={other_compute_dtype(spec)}: not in total]",
                                 [size(s.activations_other_compute or 0) for s in plan.stages]))
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
