"""The check against a machine: this node's rank count and RAM, whether a recipe's plan fits,
and when it does not, one line saying what does not fit and the first change that would
(``explain_misfit``, ``check_memory``)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from ..config import Config
from ..model_dims import ModelDims, read_model_dims
from .calibration import SAFETY_MARGIN
from .run_spec import RunSpec, spec_from_config
from .stage_estimate import MemoryPlan, estimate
from .units import GiB, gib


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


def _with(spec: RunSpec, **changes: Any) -> RunSpec:
    if "zero" in changes and isinstance(changes["zero"], dict):
        changes["zero"] = replace(spec.zero, **changes["zero"])
    return replace(spec, **changes)


def _fix(plan: MemoryPlan) -> Optional[list[str]]:
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


def explain_misfit(plan: MemoryPlan) -> str:
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
                    dims: Optional[ModelDims] = None) -> MemoryPlan:
    """The estimate for a recipe. ``device`` defaults to cuda when a device memory is given,
    else cpu (where the device is host RAM). ``dims``: the model's, when the caller has read
    them (a training run's preflight); else read here (launch/plan.py)."""
    device = device or ("cuda" if device_memory_bytes is not None else "cpu")
    dims = dims or read_model_dims(cfg.model, cfg.lora.target_modules)
    spec = spec_from_config(cfg, dims, world_size, gpus_per_node, device, attn_implementation, kept_fraction)
    return estimate(spec, device_memory_bytes, host_memory_bytes)


def check_memory(cfg: Config, world_size: int, gpus_per_node: int, device_memory_bytes: Optional[int],
                 host_memory_bytes: Optional[int], attn_implementation: Optional[str] = None,
                 dims: Optional[ModelDims] = None) -> Optional[str]:
    """None when the run's estimate fits with ``SAFETY_MARGIN`` to spare, else one line naming
    what does not fit and what to change (and ``train.skip_memory_check=true``).

    GPUs: pass each GPU's memory; host RAM is checked too when ``host_memory_bytes`` is given.
    CPU: pass ``device_memory_bytes=None``; then every rank's tensors are host RAM and the
    ranks of one machine (``gpus_per_node``) are checked together against it.
    ``dims``: the model's, as preflight read them; without them they are read here.
    Raises ConfigError / ModelError for a recipe or model that cannot be read.
    """
    plan = plan_for_config(cfg, world_size, gpus_per_node, device_memory_bytes, host_memory_bytes,
                           attn_implementation=attn_implementation, dims=dims)
    return None if plan.fits else explain_misfit(plan)
