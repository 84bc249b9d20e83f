"""The thin distributed layer around the pure algorithm: process-group start,
all-reduce of the sampling statistics, broadcast of the selection and the check that
every rank holds the same one.

Works on NCCL (CUDA) and gloo (CPU): collectives run on ``DistInfo.device``, which is
the rank's CUDA device under NCCL and the CPU under gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .importance import ImportanceStats, Selection


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


def init_distributed() -> DistInfo:
    """Start (or join) the process group the way DeepSpeed does: NCCL on CUDA, gloo on
    CPU. Works under the deepspeed launcher and torchrun (both set RANK, WORLD_SIZE,
    MASTER_ADDR...; our SLURM script runs torchrun once per node) or as a bare single
    process."""
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
    deepspeed.init_distributed(auto_mpi_discovery=False)
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


def all_reduce_stats(stats: ImportanceStats, device: torch.device) -> ImportanceStats:
    """Sum every rank's float64 statistics (one collective for both tensors)."""
    packed = torch.stack([stats.sq_norm_sums, stats.token_counts]).to(device=device, dtype=torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed = packed.cpu()
    return ImportanceStats(list(stats.module_names), packed[0].clone(), packed[1].clone())


def broadcast_selection(selection: Selection | None, info: DistInfo) -> Selection:
    """Send rank 0's selection to every rank."""
    payload = [selection.to_json() if info.is_main else None]
    dist.broadcast_object_list(payload, src=0, device=info.device)
    return Selection.from_json(payload[0])


def check_selection_agreement(selection: Selection, info: DistInfo) -> None:
    """Raise :class:`SelectionMismatchError` on *every* rank unless all ranks hold the
    same selection (compared through its fingerprint: min == max across ranks)."""
    digest = bytes.fromhex(selection.fingerprint())
    words = [int.from_bytes(digest[i:i + 8], "little", signed=True) for i in range(0, 32, 8)]
    local = torch.tensor(words, dtype=torch.int64, device=info.device)
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise SelectionMismatchError(
            f"rank {info.rank}: ranks disagree on the LoRA-drop selection (this rank kept {selection.kept}); "
            "the statistics or the broadcast differ between ranks. Refusing to rebuild the model."
        )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
