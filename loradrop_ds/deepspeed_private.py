"""Every use of DeepSpeed's private internals, in one place: what to re-test before
widening the pinned DeepSpeed range (pyproject.toml; read in 0.19.8, tested with 0.19.8
and 0.19.5).

- :func:`release_engine`: tearing an engine down so its ZeRO-3 model can be freed or
  built on again (``FWD_MODULE_STACK``, the ``lru_cache`` on the parameter coordinator's
  ``__params_to_release``, the per-module hook state, each parameter's ``_z3_optimizer``);
  tests/test_engine.py fails when DeepSpeed stops leaking, so the workaround can go.
- :func:`forget_zero3_trace`: the prefetch trace reset after an evaluation.
- :func:`own_partition`, :func:`create_adam_state` and :func:`restore_working_copy`: reading
  and writing one rank's slice of the fp32 master weights and Adam moments, and rebuilding the
  working copy the forward pass uses from it (resume from a checkpoint, at any number of ranks).

Everything here is the same on CUDA/NCCL and CPU/gloo: none of it touches a device API.
"""

from __future__ import annotations

import gc
from typing import Any, Optional

import torch

# Per-module attributes DeepSpeed's ZeRO-3 registration leaves on every module and that
# engine.destroy() does not remove (parameter_offload.py, DeepSpeed 0.19.8). The two
# autograd Functions close over the old engine's offload object: a new engine on the same
# module would keep calling the old parameter coordinator in backward, because
# registration only creates them `if "pre_bwd_fn" not in module.__dict__`.
_ZERO3_MODULE_STATE = ("pre_bwd_fn", "post_bwd_fn", "applied_pre_backward_ref_cnt", "ds_grads_remaining")


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


def own_partition(param: Any, optim_state_key: Optional[str]) -> tuple[torch.Tensor, int]:
    """This rank's ZeRO-3 partition of ``param``'s fp32 master (``optim_state_key=None``) or
    Adam moment, a view into the optimizer's flat fp32 buffer, and the index in the flattened
    full tensor where it starts.

    DeepSpeed 0.19.8 (``partition_parameters.py`` ``_partition_param``): a parameter of
    ``ds_numel`` elements is split into ``world`` partitions of ``ceil(ds_numel / world)``
    elements; rank r holds elements ``[r * size, (r + 1) * size)`` of the flattened
    parameter, and the part past ``ds_numel`` (the last ranks') is padding. The optimizer's
    fp32 partition (``stage3.py`` ``_get_fp32_opt_state_partition``) has the same size and
    order. Its ``set_full_hp_param`` narrows the full value without clamping, which fails on
    the last ranks when the size does not divide by the number of ranks (SmolLM2 at r = 8 on
    5 ranks, Llama on 3 or 24): callers here clamp and zero the padding instead."""
    opt = param._z3_optimizer
    partition, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                     optim_state_key=optim_state_key)
    return partition, partition.numel() * opt._get_param_partition_rank(param)


def restore_working_copy(engine: Any) -> None:
    """After the fp32 master partitions were written: the working copy the forward pass
    gathers (each parameter's ``ds_tensor``, in the model's dtype) from them, and the
    resident (persistent) parameters gathered whole again, as DeepSpeed 0.19.8 does after
    loading its own checkpoint (``engine.load_checkpoint``: ``checkpoint_event_prologue``,
    ``stage3.py`` ``_rigid_load_state_dict``'s fp32 -> low-precision copy and unflatten, here
    ``_reassign_or_swap_out_partitioned_parameters``, the same per sub-group step that ends an
    optimizer step; then ``checkpoint_event_epilogue``, which also drops hpZ's secondary
    copies, so none is gathered from stale values: tests/test_resume.py's hpZ resume fails
    without it). The copy is the optimizer's own cast, so a bf16 working copy is bit for bit
    the one an uninterrupted run holds. The prologue partitions every parameter, the resident
    ones too: a no-op on an engine that has not run a forward yet (every resume here: resident
    parameters are first gathered by the first forward, from the partitions written here),
    kept so that a restore after a forward would not leave them holding old values."""
    opt = engine.optimizer
    opt.checkpoint_event_prologue()
    for sub_group in range(len(opt.fp32_partitioned_groups_flat)):
        opt._reassign_or_swap_out_partitioned_parameters(sub_group)
    opt.checkpoint_event_epilogue()


def create_adam_state(engine: Any) -> None:
    """Create the AdamW state of every ZeRO-3 fp32 partition now (torch's AdamW creates it
    lazily at the first step), so a resumed run can write its moments before stepping.
    ``fp32_partitioned_groups_flat`` is stage3.py's list of this rank's flat partitions."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for flat in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []):
        st = inner.state[flat]
        st.setdefault("step", torch.zeros((), dtype=torch.float32))
        for key in ("exp_avg", "exp_avg_sq"):
            st.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
