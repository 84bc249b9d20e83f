"""A checkpoint's training state, stored once and independent of the number of ranks: the
trainable (LoRA) parameters' fp32 master values and AdamW moments as full tensors, and the
optimizer's scalars.

Two files in the checkpoint directory:

* ``optimizer_state.safetensors``: for every trainable parameter ``N`` (as
  ``engine.module.named_parameters()`` names it; a shared LoRA once), the tensors
  ``fp32/N``, ``exp_avg/N`` and ``exp_avg_sq/N``, fp32, flattened to one dimension;
* ``optimizer_state.json``: the format, each parameter's shape, the AdamW step, every param
  group's hyperparameters (``lr`` among them), the LR scheduler's state and the engine's
  ``global_steps`` and ``global_samples``.

Why this is the only copy. DeepSpeed's own checkpoint (``engine.save_checkpoint``, the
``ds/`` directory checkpoints had until this module) holds the same numbers a second time,
partitioned: each rank's flat fp32 partition and its two moments, plus a model-state file per
rank (names, shapes, buffers: DeepSpeed 0.19.8 partitions every parameter, resident ones too,
before it saves, ``checkpoint_event_prologue``), so its total grows with the number of ranks
(measured: docs/CHECKPOINTS.md). Everything a resume needs is in the two files above, at any
number of ranks; resuming from them at the same number is exact as well (the
fp32 values are copied bit for bit, and the working copy is the optimizer's own cast of
them, ``deepspeed_private.restore_working_copy``), so ``ds/`` is no longer written.

Writing (:func:`write_training_state`, a collective): the parameters are gathered one at a
time (DeepSpeed's ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``, an
all-gather each) and rank 0 streams them into the file behind a header written first
(``safetensors_header.encode_header``): rank 0's host RAM holds one parameter's full
tensors, not the whole state (about 2.5 GB at 70B with r = 16 on all seven projections).
The alternative, every rank writing its own slices into one shared file at their offsets,
would need no gather but relies on concurrent writes to one file from several nodes, which
NFS does not promise.

Reading (:func:`load_training_state`, every rank): a ZeRO-3 partition is one contiguous
range of the flattened parameter (``deepspeed_private.own_partition``), so each rank reads
only its own byte ranges of the file, straight into its partitions (the header gives each
tensor's offset): host RAM on resume is this rank's partitions, not the whole state on every
rank. Plain reads, not a memory map: mapped pages would count in the rank's RSS until the file
is closed (measured: docs/CHECKPOINTS.md), read ones stay in the page cache only.

Older checkpoints hold ``full_state.pt`` (the same tensors, nested per parameter, in one
``torch.save`` file) beside ``ds/``: they resume through the same code, the file memory-mapped
(``torch.load(..., mmap=True)``) so that each rank touches its own slices' pages only.
Checkpoints with neither (from before resume on another number of ranks existed) are refused
(:func:`unreadable_reason`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .safetensors_header import encode_header

TENSORS = "optimizer_state.safetensors"
SCALARS = "optimizer_state.json"
LEGACY_FULL_STATE = "full_state.pt"  # the older format: read, never written
FORMAT = 1
FP32 = "fp32"
MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-element state (engine.create_engine: amsgrad off)
KINDS = (FP32, *MOMENTS)


def _trainable(engine: Any) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _inner_optimizer(engine: Any) -> Any:
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _optimizer_step(engine: Any) -> float:
    """AdamW's step, the same for every flat partition; a state key this module would not save
    is an error here rather than a resume that silently loses it."""
    states = list(_inner_optimizer(engine).state.values())
    unsaved = sorted({k for st in states for k in st} - {"step", *MOMENTS})
    if unsaved:
        raise RuntimeError(f"the optimizer holds state {unsaved} that checkpoints do not save")
    steps = {float(st["step"]) for st in states if "step" in st}
    if len(steps) > 1:
        raise RuntimeError(f"the optimizer's partitions disagree on the step: {sorted(steps)}")
    return steps.pop() if steps else 0.0


# ------------------------------------------------------------------------- writing


@dataclass
class WrittenState:
    """What :func:`write_training_state` left on this rank: the files it wrote (rank 0), or the
    error that stopped rank 0's writing. The error is raised by :meth:`files`, which the caller
    runs inside ``distributed.run_on_every_rank``, so every rank stops together instead of the
    others waiting in the next gather."""

    written: list[Path] = field(default_factory=list)
    error: Optional[BaseException] = None

    def files(self) -> list[Path]:
        if self.error is not None:
            raise self.error
        return self.written


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` with the file it was writing named (a failed ``write`` names none), so that a
    full disk's one line says which file (``disk_full.disk_full_reported``)."""
    if error.filename is None:
        named = OSError(error.errno, error.strerror, str(path))
        named.__cause__ = error
        return named
    return error


class _StreamedFile:
    """A safetensors file written tensor by tensor after its header; the first error is kept
    (and later writes skipped) so that rank 0 goes on taking part in the gathers."""

    def __init__(self, path: Path, tensors: list[tuple[str, str, list[int]]]):
        self.path, self.expected, self.error = path, [math.prod(shape) for _, _, shape in tensors], None
        self.file = None
        try:
            header, _ = encode_header(tensors)
            self.file = open(path, "wb")
            self.file.write(header)
        except OSError as e:
            self.error = _naming(e, path)

    def write(self, tensor: torch.Tensor) -> None:
        if self.error is not None:
            return
        want = self.expected.pop(0)
        if tensor.numel() != want:
            self.error = RuntimeError(f"{self.path}: a tensor of {tensor.numel()} elements where the header says {want}")
            return
        try:
            self.file.write(memoryview(tensor.detach().to("cpu", torch.float32).contiguous().numpy()).cast("B"))
        except OSError as e:
            self.error = _naming(e, self.path)

    def close(self) -> Optional[BaseException]:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as e:
                self.error = self.error or _naming(e, self.path)
        if self.error is None and self.expected:
            self.error = RuntimeError(f"{self.path}: {len(self.expected)} tensors of the header were not written")
        return self.error


def write_training_state(engine: Any, directory: Path, is_main: bool) -> WrittenState:
    """Write :data:`TENSORS` and :data:`SCALARS` into ``directory`` (rank 0). A ZeRO-3
    collective: call on every rank; see the module docstring for the order of work."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    trainable = _trainable(engine)
    step = _optimizer_step(engine)  # checked on every rank before the first gather
    shapes = {n: list(p.ds_shape if hasattr(p, "ds_shape") else p.shape) for n, p in trainable}
    stream = (_StreamedFile(directory / TENSORS, [(f"{kind}/{n}", "F32", [math.prod(shapes[n])])
                                                  for n, _ in trainable for kind in KINDS]) if is_main else None)
    for _, p in trainable:
        for kind in KINDS:
            full = safe_get_full_fp32_param(p) if kind == FP32 else safe_get_full_optimizer_state(p, kind)
            if stream is not None:
                stream.write(full)
            del full
    if stream is None:
        return WrittenState()
    if stream.close() is not None:
        return WrittenState(error=stream.error)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in _inner_optimizer(engine).param_groups]
    scalars = {"format": FORMAT, "kinds": list(KINDS), "shapes": shapes, "optimizer_step": step,
               "param_groups": groups,
               "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
               "global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples)}
    try:
        (directory / SCALARS).write_text(json.dumps(scalars, separators=(",", ":")))
    except OSError as e:
        return WrittenState(error=_naming(e, directory / SCALARS))
    except (TypeError, ValueError) as e:  # a scheduler state JSON cannot hold
        return WrittenState(error=e)
    return WrittenState([directory / TENSORS, directory / SCALARS])


# ------------------------------------------------------------------------- reading


@dataclass
class _Source:
    """A checkpoint's training state as read: its scalars (in this format's layout) and
    ``read_into(name, kind, start, out)``, which fills ``out`` with elements ``[start, start +
    out.numel())`` of a flattened full tensor."""

    scalars: dict
    read_into: Callable[[str, str, int, torch.Tensor], None]


def _slice_reader(path: Path) -> tuple[Callable[[str, str, int, torch.Tensor], None], Callable[[], None]]:
    """``read_into`` for :data:`TENSORS`: each slice read from its byte range in the file
    straight into the destination when that is a CPU tensor (into one slice-sized buffer and
    copied when it is on a GPU). Plain reads rather than a memory map: the pages read stay in
    the page cache, not in this process's RSS, so the restore's host RAM is the partitions'
    own."""
    from .safetensors_header import PREFIX_BYTES, read_header

    header = read_header(path)
    data_start = PREFIX_BYTES + header.length
    f = open(path, "rb", buffering=0)

    def read_into(name: str, kind: str, start: int, out: torch.Tensor) -> None:
        key = f"{kind}/{name}"
        entry = header.tensors.get(key)
        if entry is None or entry.get("dtype") != "F32" or start + out.numel() > math.prod(entry["shape"]):
            from .run_checkpoint import CheckpointError

            raise CheckpointError(f"{path}: no F32 tensor {key} of at least {start + out.numel()} elements")
        target = out if out.device.type == "cpu" and out.is_contiguous() else torch.empty(out.numel())
        view = memoryview(target.numpy()).cast("B")
        f.seek(data_start + entry["data_offsets"][0] + 4 * start)
        got = f.readinto(view)
        if got != len(view):
            from .run_checkpoint import CheckpointError

            raise CheckpointError(f"{path}: {key} ends early ({got} of {len(view)} bytes read)")
        if target is not out:
            out.copy_(target)

    return read_into, f.close


def checkpoint_format(path: Path) -> Optional[str]:
    """``"current"`` (:data:`TENSORS` and :data:`SCALARS`), ``"full_state.pt"`` (the older
    format) or None (neither)."""
    path = Path(path)
    if (path / TENSORS).is_file() and (path / SCALARS).is_file():
        return "current"
    return LEGACY_FULL_STATE if (path / LEGACY_FULL_STATE).is_file() else None


def unreadable_reason(path: Path) -> Optional[str]:
    """None if this version can resume from the checkpoint at ``path``, else one line saying
    why not and what to do."""
    if checkpoint_format(path) is not None:
        return None
    return (f"checkpoint {path} holds neither {TENSORS} nor {LEGACY_FULL_STATE}: it was written before resume on "
            "another number of ranks existed, and only DeepSpeed's per-rank ds/ files hold its optimizer state, "
            "which this version does not read; finish that run with the version that wrote it, or start afresh "
            "(overwrite=true)")


@contextlib.contextmanager
def open_training_state(path: Path) -> Iterator[_Source]:
    """The training state of the checkpoint at ``path``, current or older format."""
    path = Path(path)
    found = checkpoint_format(path)
    if found is None:
        from .run_checkpoint import CheckpointError

        raise CheckpointError(unreadable_reason(path))
    if found == "current":
        read_into, close = _slice_reader(path / TENSORS)
        try:
            yield _Source(json.loads((path / SCALARS).read_text()), read_into)
        finally:
            close()
        return
    # The older format: one torch.save file. Memory-mapped (torch.load's mmap, for the zip format
    # torch.save writes), so a rank's slices bring in only their own pages; each is copied out.
    saved = torch.load(path / LEGACY_FULL_STATE, weights_only=True, mmap=True)
    scalars = {"format": 0, "kinds": list(KINDS),
               "shapes": {n: list(t["fp32"].shape) for n, t in saved["params"].items()},
               "optimizer_step": saved["optimizer_step"], "param_groups": [{"lr": lr} for lr in saved["lrs"]],
               "lr_scheduler": saved["lr_scheduler"], "global_steps": saved["global_steps"],
               "global_samples": saved["global_samples"]}
    yield _Source(scalars, lambda name, kind, start, out: out.copy_(
        saved["params"][name][kind].flatten()[start:start + out.numel()]))


def load_training_state(engine: Any, path: Path) -> None:
    """The checkpoint's training state into a freshly built engine, on any number of ranks:
    each rank reads and writes only its own partition of every parameter and moment, then
    the working copy is rebuilt from the fp32 master and the scalars restored. Call on every
    rank (the working copy's rebuild gathers the resident parameters)."""
    from .deepspeed_private import create_adam_state, own_partition, restore_working_copy
    from .run_checkpoint import CheckpointError

    if getattr(engine.optimizer, "swap_optimizer", False):
        # stage3.py keeps NVMe-offloaded optimizer state in swap buffers that writes into a
        # partition would have to be swapped out after; not written nor tested here.
        raise CheckpointError(f"resuming from {path} with zero_optimization.offload_optimizer.device=nvme is not "
                              "supported: the optimizer state is restored into partitions held in memory only "
                              "(offload_optimizer to cpu, or none)")
    trainable = _trainable(engine)
    with open_training_state(path) as source:
        scalars = source.scalars
        shapes = scalars["shapes"]
        if sorted(shapes) != sorted(n for n, _ in trainable):
            raise CheckpointError(f"checkpoint {path} holds other trainable parameters than this run builds")
        create_adam_state(engine)
        for name, p in trainable:
            numel = math.prod(shapes[name])
            if numel != p.ds_numel:
                raise CheckpointError(f"checkpoint {path}: {name} has {numel} elements there, {p.ds_numel} here")
            for kind in KINDS:
                partition, start = own_partition(p, None if kind == FP32 else kind)
                end = min(start + partition.numel(), numel)
                with torch.no_grad():
                    partition.zero_()  # the padding past the parameter's end (the last ranks)
                    if end > start:
                        source.read_into(name, kind, start, partition[: end - start])
    restore_working_copy(engine)
    _restore_scalars(engine, scalars, path)


def _restore_scalars(engine: Any, scalars: dict, path: Path) -> None:
    from .run_checkpoint import CheckpointError

    inner = _inner_optimizer(engine)
    step = scalars["optimizer_step"]
    for st in inner.state.values():
        st["step"] = torch.full_like(st["step"], step) if torch.is_tensor(st["step"]) else type(st["step"])(step)
    if len(inner.param_groups) != len(scalars["param_groups"]):
        raise CheckpointError(f"checkpoint {path} has {len(scalars['param_groups'])} optimizer param groups, this "
                              f"run {len(inner.param_groups)}")
    # As torch's Optimizer.load_state_dict: every saved hyperparameter of a group replaces the
    # built one (JSON turned tuples such as betas into lists: back into tuples).
    for group, saved in zip(inner.param_groups, scalars["param_groups"], strict=True):
        for key, value in saved.items():
            group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
    if scalars["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(scalars["lr_scheduler"])
    engine.global_steps, engine.global_samples = scalars["global_steps"], scalars["global_samples"]
