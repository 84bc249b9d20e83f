"""The thin distributed layer around the pure algorithm: process-group start and end,
running a step on every rank so that all ranks fail together, all-reduce of the
sampling statistics, broadcast of the selection and the check that every rank holds the
same one.

Works on NCCL (CUDA) and gloo (CPU): collectives run on ``DistInfo.device``, which is
the rank's CUDA device under NCCL and the CPU under gloo.

No rank may wait for a rank that has failed. A rank that raises while the others enter
a collective leaves them waiting until the collective timeout (``dist.timeout_minutes``):
on one node the launcher kills them, but ranks on other nodes (pdsh, torchrun agents on
other hosts) are not told. So every step that can fail on one rank (reading inputs,
computing the selection, writing files) runs inside :func:`run_on_every_rank`, which
ends with one collective carrying each rank's outcome: if any rank failed, every rank
raises :class:`RankFailure` with the same message.
"""

from __future__ import annotations

import datetime
import logging
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from .faults import fault_point
from .importance import ImportanceStats, Selection

log = logging.getLogger(__name__)
T = TypeVar("T")


class RankFailure(RuntimeError):
    """A step failed on some rank; raised on every rank with the same message.

    ``user_error`` is True when the failure was bad input (the CLI exits with code 2 and
    one line), False for anything unexpected (exit code 1; the failing rank also logs
    its traceback)."""

    def __init__(self, message: str, user_error: bool):
        super().__init__(message)
        self.user_error = user_error


class SelectionMismatchError(RuntimeError):
    """Ranks hold different selections: rebuilding would desynchronise ZeRO-3."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _skip_cpu_shm_build() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op (about
    40 s of g++) at process-group start. It only serves DeepSpeed's inference
    all-reduce, which training never calls, so we skip the build there. The CUDA
    accelerator has no such op; nothing changes on GPUs."""
    import importlib

    from deepspeed.accelerator import get_accelerator

    # By module path: the attribute `deepspeed.comm.torch` is the torch package itself.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if get_accelerator().device_name() == "cpu":
        ds_torch_comm.build_shm_op = lambda: None


def init_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Start (or join) the process group the way DeepSpeed does: NCCL on CUDA, gloo on
    CPU. Works under the deepspeed launcher and torchrun (both set RANK, WORLD_SIZE,
    MASTER_ADDR...; our SLURM script runs torchrun once per node) or as a bare single
    process.

    ``timeout_minutes`` bounds every collective. Checked in torch 2.13's sources: gloo
    raises in the waiting call when it expires; under NCCL the watchdog tears the process
    down (``ProcessGroupNCCL.hpp``: ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` defaults to 3,
    SkipCleanUp), so a hung rank ends instead of waiting forever."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _skip_cpu_shm_build()
    if "RANK" not in os.environ:
        # A bare `python launch/train.py`: a world of one.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    deepspeed.init_distributed(auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_minutes))
    accel = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
        # Ranks share the machine's cores: without this each rank starts one thread per
        # core and they oversubscribe (torchrun sets OMP_NUM_THREADS=1, deepspeed does not).
        if "OMP_NUM_THREADS" not in os.environ:
            # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(), local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    """Destroy the process group (on every normal or collective-error exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a rank: destroy the process group, flush what is buffered, and leave without
    interpreter finalization. Gloo's C++ threads can still hold work objects with Python
    references at interpreter exit, whose destruction then aborts the process ("terminate
    called without an active exception", SIGABRT: pytorch/pytorch#179291), turning a clean
    exit code into -6 now and then. Every file this project writes is closed (and renamed
    into place) before this point."""
    import sys

    try:
        shutdown()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def run_on_every_rank(info: DistInfo, step: str, fn: Callable[[], T],
                      user_errors: tuple[type[BaseException], ...] = (), gather: bool = False) -> Any:
    """Run ``fn()`` on this rank, then exchange outcomes with every other rank.

    Returns this rank's result when every rank succeeded, or with ``gather=True`` the
    list of every rank's result (index = rank; they travel pickled, so keep them small).
    If any rank raised, every rank raises :class:`RankFailure` carrying the lowest
    failing rank's message: instances of ``user_errors`` keep their message (bad input),
    anything else is reported as ``"<step> failed on rank R: Type: message"`` and its
    traceback is logged on the rank that raised it.

    ``fn`` must not itself run collectives that other ranks could skip: it is the
    rank-local part of a step (reading files, computing, writing). The exchange is one
    ``all_gather_object``, so it also serves as the barrier after the step. Each step is
    also a test fault point by its name (``loradrop_ds.faults``).
    """
    result: Any = None
    outcome: tuple[bool, Any]
    try:
        fault_point(info, step)
        result = fn()
        outcome = (True, result if gather else None)
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        user = isinstance(e, user_errors)
        if not user:
            log.error("%s failed on rank %d:\n%s", step, info.rank, traceback.format_exc())
        outcome = (False, (str(e) if user else f"{step} failed on rank {info.rank}: {type(e).__name__}: {e}", user))
    if info.world_size == 1:
        outcomes = [outcome]
    else:
        outcomes = [None] * info.world_size
        dist.all_gather_object(outcomes, outcome)
    for rank, (ok, payload) in enumerate(outcomes):
        if not ok:
            message, user = payload
            if info.world_size > 1 and user:
                message = f"{message} [rank {rank} of {info.world_size}]"
            raise RankFailure(message, user)
    return [payload for _, payload in outcomes] if gather else result


def all_reduce_stats(stats: ImportanceStats, device: torch.device) -> ImportanceStats:
    """Sum every rank's float64 statistics (one collective for all three tensors)."""
    packed = torch.stack([stats.sq_norm_sums, stats.token_counts, stats.grad_sq_sums]).to(device=device,
                                                                                         dtype=torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed = packed.cpu()
    return ImportanceStats(list(stats.module_names), packed[0].clone(), packed[1].clone(), packed[2].clone())


def check_same_on_every_rank(world_size: int, view: Any, error: Callable[[int, Any, Any], Exception]) -> None:
    """The one cross-rank agreement check: every rank's ``view`` (small and picklable: a
    fingerprint, a tuple of sizes) is compared with rank 0's, and if the lowest rank R
    that differs exists, every rank raises ``error(R, R's view, rank 0's view)``: the same
    exception on every rank, so no rank goes on alone. One ``all_gather_object``.

    On NCCL the pickled views travel through ``torch.cuda.current_device()`` (torch 2.13,
    ``distributed_c10d.all_gather_object``), which :func:`init_distributed` sets to this
    rank's GPU; :func:`run_on_every_rank` relies on the same. This replaced a min/max
    all-reduce of the selection's fingerprint on ``DistInfo.device``."""
    views = [view]
    if world_size > 1:
        views = [None] * world_size
        dist.all_gather_object(views, view)
    differs = next((rank for rank, v in enumerate(views) if v != views[0]), None)
    if differs is not None:
        raise error(differs, views[differs], views[0])


def check_selection_agreement(selection: Selection, info: DistInfo) -> None:
    """Raise :class:`SelectionMismatchError` on *every* rank unless all ranks hold the
    same selection (compared through its fingerprint)."""
    check_same_on_every_rank(info.world_size, selection.fingerprint(), lambda rank, _theirs, _ref: SelectionMismatchError(
        f"rank {rank} holds another LoRA-drop selection than rank 0 (rank {info.rank} kept {selection.kept}); the "
        "statistics or the broadcast differ between ranks. Refusing to rebuild the model."))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
