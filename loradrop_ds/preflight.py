"""Every input checked on every rank before any weights are read.

:func:`preflight` is the recipe's setup: it converts the builtin model once per machine,
checks the model config and target modules (on a weightless meta-device copy), the
attention kernel, the DeepSpeed config, the memory estimate, the tokenizer, the selection
request, the checkpoint to resume from and that ``output_dir`` is writable and shared by
every rank; tokenises the data into the cache (each node's local rank 0) and reads it on
every rank; checks that every rank sees the same data and that each stage's data fills
one optimizer step. Only then does rank 0 change ``output_dir``. Bad input raises one of
``errors.USER_ERRORS`` on every rank, with the same message (``run_on_every_rank``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Optional

import torch

from . import config as config_lib
from . import data as data_lib
from . import planner
from . import run_checkpoint as ckpt
from .atomic import atomic_write_text
from .distributed import DistInfo, check_same_on_every_rank, run_on_every_rank
from .engine import SizeHints, load_ds_config
from .errors import USER_ERRORS
from .importance import ParamCosts, check_selection_request, lora_param_count
from .liger import check_liger
from .lora import shared_gain_numel
from .model import (
    BUILTIN_PREFIX,
    cache_dir,
    check_architecture,
    check_tokenizer_fits,
    check_weight_files,
    load_model_config,
    load_tokenizer,
    prepare_builtin_model,
    resolve_attn_implementation,
    resolve_model_path,
)
from .model_dims import ModelDims, dims_from_config

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Inputs:
    """Everything checked before heavy work starts."""

    dims: ModelDims  # read once here; the memory check and the recipe's Pruner take them from here
    tokenizer: Any
    attn_implementation: str
    base_model: dict  # the base's identity, recorded in checkpoints (run_checkpoint.base_model_identity)
    plain_lora_params: int
    costs: ParamCosts  # what each structure trains, for loradrop.param_budget
    ds_config: dict
    resume: Optional[tuple[Path, ckpt.RunState]]
    # Filled by read_data, after each node's local rank 0 has tokenised into the cache.
    train_set: Optional[data_lib.TokenizedSet] = None
    eval_set: Optional[data_lib.TokenizedSet] = None
    sample: Optional[list[int]] = None  # indices of the sampling subset
    main_steps: int = 0  # train.max_steps, or train.num_epochs worth of steps
    # The start-up memory check's estimate (None with train.skip_memory_check): each stage's
    # summary puts its predicted tensor peak beside the measured one.
    memory_plan: Optional[planner.MemoryPlan] = None


def preflight(cfg: config_lib.Config, info: DistInfo) -> Inputs:
    """Check every input on every rank, read the data, and prepare ``output_dir``."""
    out_dir = Path(cfg.output_dir)
    if cfg.model.path.startswith(BUILTIN_PREFIX):  # one conversion per machine; the others wait
        run_on_every_rank(info, "model conversion", lambda: info.local_rank == 0 and prepare_builtin_model(
            cfg.model.path[len(BUILTIN_PREFIX):]), USER_ERRORS)
    inputs = run_on_every_rank(info, "inputs", lambda: check_inputs(cfg, info), USER_ERRORS)
    # Every rank writes its checkpoint shards into output_dir: rank 0 leaves a marker there
    # and every rank must see it (a node-local output_dir would fail at the first checkpoint).
    marker = run_on_every_rank(info, "output_dir marker", lambda: info.is_main and _write_marker(out_dir), USER_ERRORS,
                               gather=True)[0]
    try:
        inputs = run_on_every_rank(info, "data", lambda: _check_shared_output_dir(out_dir, marker, info)
                                   or read_data(cfg, info, inputs), USER_ERRORS)
    finally:
        if info.is_main:
            (out_dir / marker).unlink(missing_ok=True)
    # Every rank must see the same data: a node whose copy of a file (or tokenizer) differs
    # would index other rows and, with epochs or packing, run another number of steps.
    check_same_on_every_rank(info.world_size, _data_view(inputs), lambda rank, theirs, ref: data_lib.DataError(
        f"rank {rank} sees other data than rank 0 ({theirs} against {ref}): every node needs the same data files and "
        "tokenizer"))
    if info.is_main:
        log.info("data: %d training examples, %s eval, sampling subset %d, main stage %d steps", len(inputs.train_set),
                 len(inputs.eval_set) if inputs.eval_set is not None else "no", len(inputs.sample), inputs.main_steps)
    if inputs.resume is not None:
        log.info("resuming from %s (%s stage, step %d)", inputs.resume[0], inputs.resume[1].stage,
                 inputs.resume[1].step)
    run_on_every_rank(info, "output setup", lambda: info.is_main and _prepare_output_dir(cfg, inputs.resume),
                      USER_ERRORS)
    return inputs


def check_inputs(cfg: config_lib.Config, info: DistInfo) -> Inputs:
    """Read and check every input: model config and target modules (on a weightless
    copy), attention kernel, DeepSpeed config, tokenizer, the checkpoint to resume from,
    and (rank 0) that output_dir is writable. Each node's local rank 0 also tokenises the
    data into the cache (read_data reads it on every rank). Runs on every rank; raises
    one of USER_ERRORS for bad input."""
    # Read as from_pretrained will read it (the hub included), not from launch/plan.py's shipped
    # copies: a model that cannot be loaded is refused here. Read once per run: see ``dims``.
    model_config = load_model_config(cfg.model)
    check_architecture(model_config, cfg.model.path)
    check_liger(cfg.model, model_config, info.device.type)
    check_weight_files(cfg.model.path)  # headers only: missing shards, truncated files
    dims = dims_from_config(model_config, cfg.lora.target_modules, cfg.model)  # the run's one weightless model
    attn = resolve_attn_implementation(cfg.model.attn_implementation, info.device.type, cfg.model.dtype)
    ds_config = load_ds_config(cfg, info.world_size, SizeHints.for_model(dims, cfg.lora.r))
    memory_plan = None
    if not cfg.train.skip_memory_check:  # the estimate of launch/plan.py against this machine
        device_memory = (torch.cuda.get_device_properties(info.device).total_memory if info.device.type == "cuda"
                         else None)  # CPU ranks: every rank's tensors counted against the host's RAM
        memory_plan = planner.plan_for_config(cfg, info.world_size, planner.ranks_per_node(info.world_size),
                                              device_memory, planner.host_memory_bytes(), attn_implementation=attn,
                                              dims=dims)
        if not memory_plan.fits:
            raise config_lib.ConfigError(planner.explain_misfit(memory_plan))
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code)
    check_tokenizer_fits(tokenizer, model_config, cfg.model.tokenizer or cfg.model.path)
    plain = dims.num_layers * sum(lora_param_count(i, o, cfg.lora.r) for i, o in dims.target_shapes.values())
    drop = cfg.loradrop
    costs = ParamCosts({m: lora_param_count(i, o, cfg.lora.r) for m, (i, o) in dims.target_shapes.items()},
                       dims.num_layers, drop.train_shared,
                       shared_gain_numel(drop.shared_scale, cfg.lora.r))
    if drop.enabled:
        check_selection_request(drop.selection, drop.keep, drop.num_kept, drop.param_budget, drop.granularity,
                                dims.num_layers, list(cfg.lora.target_modules), costs)
    base = ckpt.base_model_identity(cfg.model.path, resolve_model_path(cfg.model.path))
    out_dir = Path(cfg.output_dir)
    resume = ckpt.find_resume_checkpoint(cfg.resume, out_dir, cfg.overwrite, current=(config_lib.to_dict(cfg), base))
    if resume is not None:
        ckpt.check_compatible(resume[1], config_lib.to_dict(cfg), info.world_size, base, resume[0])
    if info.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise config_lib.ConfigError(f"output_dir={out_dir} is not writable ({e.strerror}); choose another") from e
    if info.local_rank == 0:
        tokenize_data(cfg, tokenizer, build=True)
    return Inputs(dims, tokenizer, attn, base, plain, costs, ds_config, resume, memory_plan=memory_plan)


def tokenize_data(cfg: config_lib.Config, tokenizer: Any, build: bool
                  ) -> tuple[data_lib.TokenizedSet, Optional[data_lib.TokenizedSet]]:
    """The tokenised train and eval sets from the cache (``build``: tokenising what is not
    there yet). With data.eval_split_ratio the eval set is a seeded share of the train file."""
    cache = cache_dir()
    train_set, _ = data_lib.prepare_tokenized(cfg.data.train_file, "data.train_file", tokenizer, cfg.data, cache,
                                              build=build)
    eval_set = None
    if cfg.data.eval_file:
        eval_set, _ = data_lib.prepare_tokenized(cfg.data.eval_file, "data.eval_file", tokenizer, cfg.data, cache,
                                                 build=build, split=cfg.data.eval_split,
                                                 label_names=train_set.label_names)
    elif cfg.data.eval_split_ratio > 0:
        train_rows, eval_rows = data_lib.split_for_eval(len(train_set), cfg.data.eval_split_ratio, cfg.seed)
        train_set, eval_set = train_set.subset(train_rows), train_set.subset(eval_rows)
    return train_set, eval_set.head(cfg.data.max_eval_examples) if eval_set is not None else None


def read_data(cfg: config_lib.Config, info: DistInfo, inputs: Inputs) -> Inputs:
    """Every rank: the tokenised sets (memory-mapped from the cache), the sampling subset,
    and checks that each stage's data fills at least one optimizer step."""
    train_set, eval_set = tokenize_data(cfg, inputs.tokenizer, build=False)
    sample = data_lib.draw_sample(len(train_set), cfg.loradrop.sample_ratio, cfg.seed, train_set.class_labels)
    inputs = dataclasses.replace(inputs, train_set=train_set, eval_set=eval_set, sample=sample)
    unit = "packs" if cfg.data.packing else "examples"
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * info.world_size
    stages = [("data.train_file", range(len(train_set)))]
    if cfg.loradrop.enabled:
        stages.insert(0, ("the sampling subset", sample))
    items = {}
    for name, indices in stages:
        items[name] = (len(data_lib.pack_examples(train_set.lengths, indices, cfg.data.max_seq_len)) if cfg.data.packing
                       else len(indices))
        if items[name] < per_step:
            raise data_lib.DataError(
                f"{name} has {items[name]} {unit}, fewer than one optimizer step needs ({per_step} = "
                f"micro_batch_size {cfg.train.micro_batch_size} x grad_accum {cfg.train.grad_accum} x "
                f"{info.world_size} ranks); raise loradrop.sample_ratio or lower the batch size")
    main_steps = cfg.train.max_steps
    if main_steps is None:
        main_steps = data_lib.steps_for_epochs(items["data.train_file"], cfg.train.micro_batch_size, info.world_size,
                                               cfg.train.grad_accum, cfg.train.num_epochs)
    return dataclasses.replace(inputs, main_steps=main_steps)


def _write_marker(out_dir: Path) -> str:
    name = f".shared-check-{uuid.uuid4().hex}"
    (out_dir / name).write_text("")
    return name


def _check_shared_output_dir(out_dir: Path, marker: str, info: DistInfo) -> None:
    if not (out_dir / marker).exists():
        raise config_lib.ConfigError(
            f"output_dir={out_dir} on {socket.gethostname()} (rank {info.rank}) is not the directory rank 0 writes: "
            "every rank writes its checkpoint shards there, so it must be on storage that all nodes share")


def _data_view(inputs: Inputs) -> tuple:
    """What must be equal on every rank: the data's cache keys (content, tokenizer,
    settings), sizes, and the step count derived from them."""
    ev = inputs.eval_set
    return (inputs.train_set.cache_key, len(inputs.train_set), ev.cache_key if ev else None, len(ev) if ev else 0,
            len(inputs.sample), inputs.main_steps)


def _prepare_output_dir(cfg: config_lib.Config, resume: Optional[tuple[Path, ckpt.RunState]]) -> None:
    """Rank 0, only now that every input is accepted: a resumed run's metrics cut back to
    its checkpoint, or (overwrite=true, said explicitly) the earlier run moved aside, not
    deleted; then config.yaml."""
    out_dir = Path(cfg.output_dir)
    if resume is not None:
        ckpt.truncate_metrics(out_dir, resume[1].stage, resume[1].step)
    elif cfg.overwrite:
        ckpt.move_run_aside(out_dir)
    atomic_write_text(out_dir / "config.yaml", config_lib.dump_yaml(cfg))
