"""Resumable run checkpoints: complete or absent, small, and exact.

A checkpoint is a directory ``output_dir/checkpoints/<stage>-step<NNNNNNN>/`` holding

* ``optimizer_state.safetensors`` and ``optimizer_state.json``: the trainable LoRA
  parameters' fp32 master values and AdamW moments as full tensors, with the optimizer
  step, param groups and LR scheduler state (``training_state``): the one copy of the
  optimizer state, independent of the number of ranks, from which a run resumes on any
  number of them (each rank reading only its own slices). DeepSpeed's own per-rank
  checkpoint is not written: it held the same state a second time;
* ``adapter/``: the LoRA weights gathered into a standard PEFT adapter (what export reads,
  without DeepSpeed or ranks);
* ``rng/rank<R>.pt`` and, in the sampling stage, ``stats/rank<R>.safetensors``: each rank's
  RNG state and its partial LoRA-output statistics (the only files per rank);
* ``state.json``: stage, step, data position, world size, resolved config, base model
  identity, the selection once made and the results so far;
* ``COMPLETE.json``, written last: the manifest of every file with its size.

Every rank writes into ``checkpoints/.tmp-<name>/``; rank 0 then writes the manifest and
renames the directory into place, so a checkpoint appears whole or not at all. A run's
directory must be on storage every rank sees (a shared filesystem across nodes), as for
any DeepSpeed checkpoint. Old checkpoints are pruned only after a newer one is complete, so
``keep_last + 1`` exist while one is written (``planner.checkpoint_bytes``).

Checkpoints of the older format (``ds/`` and ``full_state.pt``) still resume, at any number
of ranks, from their ``full_state.pt`` (``training_state``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import training_state
from .atomic import atomic_write_text
from .disk_full import DiskFullError, disk_full_reported
from .faults import fault_point
from .importance import ImportanceStats

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE.json"
STAGES = ("sampling", "main")
_NAME = re.compile(r"^(sampling|main)-step(\d{7})$")
# Settings that may change between a run and its resumption without changing the result.
RESUMABLE_CHANGES = {"output_dir", "resume", "train.log_every", "train.eval_every", "train.save_every",
                     "train.keep_last", "train.save_probe_logits", "data.max_eval_examples", "data.num_proc",
                     "train.report_to", "train.skip_memory_check", "overwrite", "train.preempt_signals"}
# Files and directories a run writes into output_dir (moved aside together by overwrite=true).
RUN_FILES = (CHECKPOINTS, "adapter", "summary.json", "config.yaml", "metrics.jsonl", "metrics.jsonl.previous",
             "selection.json", "importance.png", "selection_history.png", "probe_logits.safetensors")
FULL_STATE = training_state.LEGACY_FULL_STATE  # the older format's rank-independent state (read only)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


@dataclass
class RunState:
    stage: str  # "sampling" or "main"
    step: int  # optimizer steps completed in this stage
    stream_position: int  # global micro-batches consumed by this stage's BatchStream
    world_size: int
    config: dict
    base_model: dict  # {"path": ..., "config_sha256": ...}
    selection: Optional[dict] = None  # Selection as a dict, once made
    results: dict = field(default_factory=dict)  # zero-shot eval, sampling summary, ...


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}-step{step:07d}"


def base_model_identity(model_path: str, resolved_path: str) -> dict:
    """The base model a run trains on: its path as configured and a digest of its
    config.json, so a checkpoint can be matched against another base model."""
    cfg_file = Path(resolved_path) / "config.json"
    digest = hashlib.sha256(cfg_file.read_bytes()).hexdigest() if cfg_file.is_file() else None
    return {"path": model_path, "config_sha256": digest}


def config_differences(saved: dict, current: dict) -> list[str]:
    """Settings that differ and would change the result of a resumed run."""
    from .config import Config, dotted, to_dict

    # A setting added since the checkpoint was written ran as its default did not exist:
    # the saved run is read with the defaults of this version for the keys it lacks.
    a, b = {**dotted(to_dict(Config())), **dotted(saved)}, dotted(current)
    keys = sorted((set(a) | set(b)) - RESUMABLE_CHANGES)
    return [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


# ------------------------------------------------------------------------- writing


def _sizes(root: Path, files: list[Path]) -> dict[str, int]:
    return {str(f.relative_to(root)): f.stat().st_size for f in files}


def save_run_checkpoint(engine: Any, out_dir: Path, state: RunState, info: Any, keep_last: int,
                        stats: Optional[ImportanceStats] = None,
                        write_extra: Optional[Callable[[Path], list[Path]]] = None) -> Path:
    """Write a checkpoint of the current engine and run state. Call on every rank.

    Every rank writes its own files and reports their sizes; rank 0 builds the manifest
    from those reports (not from a listing of the shared directory, where another node's
    files may not be visible yet), writes it last and renames the directory into place.
    A failure on any rank is raised on every rank (``run_on_every_rank``).
    "before-marker:NAME" and "before-rename:NAME" are test fault points (``faults``).
    ``write_extra(dir)`` runs on rank 0 and returns the files it
    wrote into the checkpoint (LoRAPrune's state and masks); they join the manifest.
    """
    from . import distributed
    from .adapter_io import gather_lora_state, save_adapter

    root = Path(out_dir) / CHECKPOINTS
    name = checkpoint_name(state.stage, state.step)
    tmp, final = root / f".tmp-{name}", root / name
    point = lambda where, path=None: fault_point(info, f"{where}:{name}", path)  # noqa: E731

    def every_rank(fn: Callable[[], Any], gather: bool = False) -> Any:
        # A full disk on any rank is one line on every rank (exit 2); after any failure rank 0
        # removes the partial .tmp-<name> (it was never a checkpoint; this frees its space).
        try:
            with_space = lambda: _reporting_disk_full(out_dir, fn)  # noqa: E731
            return distributed.run_on_every_rank(info, "checkpoint", with_space, (DiskFullError,), gather=gather)
        except distributed.RankFailure:
            if info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def make_tmp() -> None:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
            (tmp / "stats").mkdir()

    every_rank(make_tmp)
    adapter_state = gather_lora_state(engine.module, copy_here=info.is_main)  # collective
    optimizer_state = training_state.write_training_state(engine, tmp, info.is_main)  # collective; rank 0 writes

    def write_rank_files() -> dict[str, int]:
        point("rank-files", tmp / "rng" / f"rank{info.rank}.pt")
        written = list(optimizer_state.files())  # rank 0's, or the error that stopped its write
        rng = {"cpu": torch.get_rng_state()}
        if info.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(info.device)
        written.append(tmp / "rng" / f"rank{info.rank}.pt")
        torch.save(rng, written[-1])
        if stats is not None:
            from safetensors.torch import save_file

            written.append(tmp / "stats" / f"rank{info.rank}.safetensors")
            save_file({"sq_norm_sums": stats.sq_norm_sums.detach().cpu(),
                       "token_counts": stats.token_counts.detach().cpu(),
                       "grad_sq_sums": stats.grad_sq_sums.detach().cpu()},
                      written[-1], metadata={"module_names": json.dumps(stats.module_names)})
        if info.is_main:
            adapter = save_adapter(engine.module, tmp / "adapter", True, state=adapter_state)
            atomic_write_text(tmp / "state.json", json.dumps(asdict(state), indent=2), fsync=True)
            written += [f for f in sorted(adapter.rglob("*")) if f.is_file()] + [tmp / "state.json"]
            if write_extra is not None:
                written += write_extra(tmp)
        return _sizes(tmp, written)

    per_rank = every_rank(write_rank_files, gather=True)
    point("before-marker")

    def publish() -> None:
        if not info.is_main:
            return
        files = {rel: size for rank_files in per_rank for rel, size in rank_files.items()}
        manifest = {"name": name, "files": dict(sorted(files.items()))}
        point("marker", tmp / MARKER)
        atomic_write_text(tmp / MARKER, json.dumps(manifest, indent=2), fsync=True)
        point("before-rename")
        if final.exists():  # a re-save of the same step (after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(root, keep_last)
        log.info("checkpoint written: %s", final)

    every_rank(publish)
    return final


def _reporting_disk_full(out_dir: Path, fn: Callable[[], Any]) -> Any:
    with disk_full_reported(Path(out_dir) / CHECKPOINTS, lambda: disk_full_fix(out_dir)):
        return fn()


def disk_full_fix(out_dir: Path) -> str:
    """What to do after a full disk stopped run ``out_dir``, and which checkpoint it resumes from."""
    found = list_checkpoints(out_dir, warn=False)
    left = (f"the last complete checkpoint {found[0][0].name} is intact and resume=auto continues from it" if found
            else "no checkpoint is complete yet: start again with overwrite=true (this run's files are moved aside)")
    return f"free space or point output_dir elsewhere; {left}"


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop older ones and stale
    temporaries (a crash mid-write leaves a ``.tmp-*`` that is never complete)."""
    complete = [p for p, _ in list_checkpoints(root.parent, warn=False)]
    for old in complete[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


# ------------------------------------------------------------------------- reading


def verify_checkpoint(path: Path) -> Optional[str]:
    """None if ``path`` is a complete checkpoint, else why not."""
    return _checked(path)[1]


def _checked(path: Path) -> tuple[Optional[RunState], Optional[str]]:
    """``(its run state, None)`` for a complete checkpoint, else ``(None, why not)``."""
    marker = path / MARKER
    if not marker.is_file():
        return None, f"no {MARKER} (the write was interrupted)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return None, f"unreadable {MARKER} ({e})"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return None, f"{rel} is missing"
        if f.stat().st_size != size:
            return None, f"{rel} is {f.stat().st_size} bytes, expected {size} (truncated)"
    try:
        return read_state(path), None
    except CheckpointError as e:
        return None, str(e)


def read_state(path: Path) -> RunState:
    """The run state a checkpoint holds; CheckpointError naming the file if it cannot be read."""
    file = Path(path) / "state.json"
    try:
        return RunState(**json.loads(file.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{file} cannot be read as a run state ({type(e).__name__}: {e})") from e


def _order(path: Path) -> tuple[int, int]:
    m = _NAME.match(path.name)
    return (STAGES.index(m.group(1)), int(m.group(2))) if m else (-1, -1)


def list_checkpoints(out_dir: Path, warn: bool = True) -> list[tuple[Path, RunState]]:
    """Complete checkpoints of a run, newest first; incomplete ones are skipped (with a
    warning when ``warn``)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in sorted((p for p in root.iterdir() if _NAME.match(p.name)), key=_order, reverse=True):
        state, problem = _checked(path)
        if problem:
            if warn:
                log.warning("skipping checkpoint %s: %s", path, problem)
            continue
        found.append((path, state))
    return found


def run_exists(out_dir: Path) -> bool:
    out_dir = Path(out_dir)
    return any((out_dir / name).exists() for name in (CHECKPOINTS, "metrics.jsonl", "summary.json", "adapter"))


def run_files(out_dir: Path) -> list[Path]:
    """What an earlier run left in ``out_dir`` (see RUN_FILES)."""
    return [Path(out_dir) / name for name in RUN_FILES if (Path(out_dir) / name).exists()]


def move_run_aside(out_dir: Path) -> Optional[Path]:
    """overwrite=true: move an earlier run's files into ``out_dir/overwritten-<time>/``
    (nothing is deleted). Call on rank 0 only, after every input check passed."""
    import time

    found = run_files(out_dir)
    if not found:
        return None
    aside = Path(out_dir) / f"overwritten-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
    aside.mkdir()
    for f in found:
        os.replace(f, aside / f.name)
    log.warning("overwrite=true: the earlier run in %s was moved to %s", out_dir, aside)
    return aside


def find_resume_checkpoint(resume: str, out_dir: Path, overwrite: bool = False,
                           current: Optional[tuple[dict, dict]] = None) -> Optional[tuple[Path, RunState]]:
    """Resolve the ``resume`` setting to a checkpoint (or None: start fresh).

    ``resume=auto`` continues the newest complete checkpoint, but never trains over a
    finished run (``summary.json`` or a final ``adapter/`` in ``out_dir``) nor over the
    files of a run none of whose checkpoints is complete: those are refused unless
    ``overwrite`` (start afresh; the earlier files are moved aside by ``move_run_aside``).
    ``current``: this run's (config dict, base model identity), so that the refusal of a
    finished run says how it differs from this one."""
    out_dir = Path(out_dir)
    fix = (f"use a new output_dir (with resume=never to be sure), or overwrite=true to move the earlier run "
           f"into {out_dir}/overwritten-<time>/ and start afresh")
    if overwrite:
        if resume not in ("auto", "never"):
            raise CheckpointError(f"overwrite=true starts a new run and cannot be combined with resume={resume}; "
                                  "drop one of them")
        # Only what would otherwise be refused is replaced: an unfinished run with a complete
        # checkpoint still resumes under resume=auto, so a requeued job keeps its progress.
        finished = any((out_dir / name).exists() for name in ("summary.json", "adapter"))
        found = list_checkpoints(out_dir) if resume == "auto" and not finished else []
        return found[0] if found else None
    if resume == "never":
        if run_exists(out_dir):
            raise CheckpointError(f"output_dir {out_dir} already holds a run and resume=never; choose another "
                                  "output_dir, delete it, use resume=auto to continue it, or overwrite=true")
        return None
    if resume == "auto":
        finished = [name for name in ("summary.json", "adapter") if (out_dir / name).exists()]
        if finished:
            raise CheckpointError(f"output_dir {out_dir} holds a finished run ({', '.join(finished)})"
                                  f"{_how_it_differs(out_dir, current)}; resume=auto does not train over it: {fix}")
        found = list_checkpoints(out_dir)
        if found:
            return found[0]
        leftovers = run_files(out_dir)
        if leftovers:
            raise CheckpointError(f"output_dir {out_dir} holds files of an earlier run "
                                  f"({', '.join(f.name for f in leftovers)}) but no complete checkpoint to resume "
                                  f"from: {fix}")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume={resume}: no such checkpoint directory")
    if not _NAME.match(path.name):
        raise CheckpointError(f"resume={resume}: not a checkpoint directory (names look like "
                              f"{checkpoint_name('main', 25)}; .tmp-* directories are unfinished writes)")
    state, problem = _checked(path)
    if problem:
        raise CheckpointError(f"resume={resume}: not a complete checkpoint: {problem}")
    return path, state


def _how_it_differs(out_dir: Path, current: Optional[tuple[dict, dict]]) -> str:
    """For the refusal of a finished run: how its newest checkpoint differs from this run
    (other settings, another base model), or which file of it cannot be read."""
    if current is None:
        return ""
    root = Path(out_dir) / CHECKPOINTS
    names = sorted((p for p in root.iterdir() if _NAME.match(p.name)), key=_order, reverse=True) if root.is_dir() else []
    if not names:
        return " with no checkpoint to compare this run with"
    try:
        state = read_state(names[0])
    except CheckpointError as e:
        return f" whose newest checkpoint cannot be read: {e}"
    config, base = current
    if state.base_model.get("config_sha256") != base.get("config_sha256"):
        return f" trained on another base model ({state.base_model.get('path')!r}: config.json differs)"
    diffs = config_differences(state.config, config)
    return f" made with other settings ({'; '.join(diffs)})" if diffs else " made with these settings"


def global_batch(config: dict, world_size: int) -> int:
    return config["train"]["micro_batch_size"] * config["train"]["grad_accum"] * world_size


def check_compatible(state: RunState, config: dict, world_size: int, base_model: dict, path: Path) -> None:
    """Refuse a resume that would not continue the same run.

    Another number of ranks is accepted (the training state is rank-independent);
    ``train.grad_accum`` may change with it when the global batch (micro_batch_size x
    grad_accum x ranks) stays the same. A checkpoint whose optimizer state this version
    cannot read (DeepSpeed's ``ds/`` only) is refused with what to do."""
    if state.base_model.get("config_sha256") != base_model.get("config_sha256"):
        raise CheckpointError(f"checkpoint {path} was trained on base model {state.base_model.get('path')!r}, "
                              f"which differs from model.path={base_model.get('path')!r} (config.json differs)")
    unreadable = training_state.unreadable_reason(path)
    if unreadable:
        raise CheckpointError(unreadable)
    diffs = config_differences(state.config, config)
    if state.world_size != world_size and global_batch(state.config, state.world_size) == global_batch(config,
                                                                                                     world_size):
        diffs = [d for d in diffs if not d.startswith("train.grad_accum:")]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was made with other settings; resuming would not continue "
                              "the same run:\n  " + "\n  ".join(diffs))
    if state.world_size != world_size and global_batch(state.config, state.world_size) != global_batch(config,
                                                                                                   world_size):
        log.warning("resuming %s on %d ranks (written by %d): the global batch changes from %d to %d items; the "
                    "data continues at the same place in the same epoch order, with other batch boundaries. Keep "
                    "micro_batch_size x grad_accum x ranks equal to continue the same run", path, world_size,
                    state.world_size, global_batch(state.config, state.world_size), global_batch(config, world_size))


def map_stream_position(position: int, num_items: int, old_group: int, new_group: int) -> int:
    """A data position (global micro-batches of ``old_group`` items consumed) as global
    micro-batches of ``new_group`` items: the same epoch, the same number of items of that
    epoch's order consumed (rounded up to a whole new micro-batch; exact when the global
    batch is unchanged, since checkpoints are taken at optimizer-step boundaries)."""
    epoch, group = divmod(position, num_items // old_group)
    # Rounding up never runs past the new epoch's last whole micro-batch (that would skip an epoch).
    return epoch * (num_items // new_group) + min(-(-group * old_group // new_group), num_items // new_group)


def restore_engine(engine: Any, batches: Any, path: Path, state: RunState, info: Any, seed: int) -> None:
    """Weights, optimizer, scheduler, RNG and data position from checkpoint ``path`` (whose
    state is ``state``) into ``engine`` and ``batches`` (a ``data.MicroBatches``), on any
    number of ranks from the rank-independent training state (``training_state``: each rank
    reads its own slices; exact, fp32 copied bit for bit). On the checkpoint's number of
    ranks the RNG and data position are restored as saved; on another, each rank's RNG is
    seeded afresh and the data position mapped to the same place in the same epoch order."""
    training_state.load_training_state(engine, path)
    if state.world_size == info.world_size:
        batches.stream.position = state.stream_position
    else:
        old_group = state.config["train"]["micro_batch_size"] * state.world_size
        batches.stream.position = map_stream_position(state.stream_position, len(batches.stream.items),
                                                      old_group, batches.stream.group)
        log.info("resumed on %d ranks from a checkpoint of %d: data position %d -> %d", info.world_size,
                 state.world_size, state.stream_position, batches.stream.position)
    restore_rng(path, info, state, seed)


def restore_rng(path: Path, info: Any, state: Optional[RunState] = None, seed: int = 0) -> None:
    """Each rank's RNG as saved; on another number of ranks (``state.world_size`` differs)
    per-rank states cannot be mapped, so each rank is seeded afresh from (seed, stage,
    step, rank): deterministic, but dropout masks differ from the uninterrupted run's."""
    if state is not None and state.world_size != info.world_size:
        key = hashlib.sha256(f"{seed}:{state.stage}:{state.step}:{info.rank}".encode()).digest()
        torch.manual_seed(int.from_bytes(key[:8], "little") >> 1)
        return
    rng = torch.load(Path(path) / "rng" / f"rank{info.rank}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and info.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], info.device)


def load_rank_stats(path: Path, info: Any, device: torch.device, saved_world_size: Optional[int] = None
                    ) -> ImportanceStats:
    """This rank's partial sampling-stage statistics. On another number of ranks than the
    checkpoint's, rank 0 takes the sum of every saved rank's and the others zeros: only
    the all-reduced total is used, and it is the same."""
    from safetensors import safe_open

    def read(rank: int) -> ImportanceStats:
        with safe_open(str(Path(path) / "stats" / f"rank{rank}.safetensors"), framework="pt") as st:
            names = json.loads(st.metadata()["module_names"])
            grads = st.get_tensor("grad_sq_sums").to(device) if "grad_sq_sums" in st.keys() else None
            return ImportanceStats(names, st.get_tensor("sq_norm_sums").to(device),
                                   st.get_tensor("token_counts").to(device), grads)

    if saved_world_size is None or saved_world_size == info.world_size:
        return read(info.rank)
    total = read(0)
    for rank in range(1, saved_world_size):
        total = total.merged(read(rank))
    if info.rank != 0:
        total = ImportanceStats.zeros(total.num_layers, total.module_names, device)
    return total


def truncate_metrics(out_dir: Path, stage: str, step: int) -> None:
    """Drop metrics a killed run logged after the checkpoint it resumes from, so that
    ``metrics.jsonl`` reads as one uninterrupted run."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    limit = (STAGES.index(stage), step)
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        # zero_shot belongs before sampling; eval records belong to the main stage.
        rec_stage = rec.get("stage")
        order = STAGES.index(rec_stage) if rec_stage in STAGES else (0 if rec_stage == "zero_shot" else 1)
        if (order, rec.get("step", 0)) <= limit:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
