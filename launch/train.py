#!/usr/bin/env python
"""LoRA-drop on DeepSpeed ZeRO-3, from a YAML recipe to a PEFT adapter.

    deepspeed --num_gpus N launch/train.py [--config recipes/NAME.yaml] [dotted.key=value ...]
    torchrun --nproc_per_node N launch/train.py [--config ...] [...]

With no --config the embedded default runs (SmolLM2-135M-Instruct on the WordNet
definition -> category task). The story, top to bottom:

1. setup       config, process group, checks of every input on every rank before any
               heavy work, and the checkpoint to resume from (resume=auto: the newest
               complete one)
2. sampling    LoRA in every layer, trained briefly on a subset while hooks record
               each LoRA's output norm; the selection so far is checked every few
               steps (sampling_steps=auto: the stage ends once it has settled)
3. selection   statistics all-reduced; rank 0 keeps the layers carrying `threshold` of
               the importance (or what fits `param_budget`, or a baseline's choice) and
               broadcasts it; every rank checks it holds it
4. rebuild     the sampling engine is released but its ZeRO-3-partitioned base is kept;
               its LoRA is replaced by fresh kept LoRAs and one shared LoRA per module
               type, and a new engine is built on the same base (no second read of it)
5. main        training on the full data, with evaluation
6. save        adapter/, selection.json, importance.png, metrics.jsonl, summary.json

Checkpoints are written every train.save_every steps and at the end of each stage. Any
step that can fail on one rank is followed by an exchange of outcomes, so all ranks stop
together with the same message (distributed.run_on_every_rank).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from loradrop_ds import adapter_io, distributed, planner  # noqa: E402
from loradrop_ds import config as config_lib
from loradrop_ds import data as data_lib
from loradrop_ds import run_checkpoint as ckpt  # noqa: E402
from loradrop_ds.cli import resolve_recipe, resolve_shipped_paths  # noqa: E402
from loradrop_ds.distributed import DistInfo, RankFailure, run_on_every_rank  # noqa: E402
from loradrop_ds.engine import SizeHints, create_engine, load_ds_config, lr_lambda, release_engine  # noqa: E402
from loradrop_ds.importance import (  # noqa: E402
    ParamCosts,
    Selection,
    SelectionError,
    check_selection_request,
    compute_selection,
    lora_param_count,
    rank_correlation,
    selection_settled,
    sharing_plan,
)
from loradrop_ds.lora import (  # noqa: E402
    ImportanceRecorder,
    adapter_as_module_state,
    add_lora,
    build_main_lora,
    lora_param_scores,
    strip_lora,
    trainable_parameter_count,
)
from loradrop_ds.metrics import MetricsLogger, format_count  # noqa: E402
from loradrop_ds.model import (  # noqa: E402
    BUILTIN_PREFIX,
    ModelError,
    ModuleInfo,
    cache_dir,
    check_architecture,
    check_tokenizer_fits,
    check_weight_files,
    describe_modules,
    load_model,
    load_model_config,
    load_tokenizer,
    prepare_builtin_model,
    resolve_attn_implementation,
    resolve_model_path,
)
from loradrop_ds.plot import plot_importance, plot_selection_history  # noqa: E402
from loradrop_ds.prune_zero3 import PRUNE_DIR, Pruner, Shape, load_state, write_prune_dir  # noqa: E402
from loradrop_ds.training import evaluate, train_stage  # noqa: E402

log = logging.getLogger("loradrop_ds.train")

# Test-only fault injection, read on each rank from its own environment:
#   LORADROP_TEST_SIGKILL_AT="STAGE:STEP" (sampling:3, main:5, selection:4) or
#     "before-marker:NAME" / "before-rename:NAME" (inside the write of checkpoint NAME):
#     rank 0 SIGKILLs itself there.
#   LORADROP_TEST_FAIL_AT="inputs" | "selection" | "save", optionally ":crash" or ":stall":
#     this rank raises a user error (":crash": an unexpected RuntimeError; ":stall": it
#     sleeps for 10 minutes instead) in that step.
SIGKILL_AT = os.environ.get("LORADROP_TEST_SIGKILL_AT")
FAIL_AT = os.environ.get("LORADROP_TEST_FAIL_AT")


class InjectedFailure(ValueError):
    """Raised by LORADROP_TEST_FAIL_AT (tests only)."""


# Bad input: every rank exits with code 2 and one line naming the setting and the fix.
USER_ERRORS = (config_lib.ConfigError, data_lib.DataError, ModelError, ckpt.CheckpointError, SelectionError,
               InjectedFailure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (default: the embedded default recipe)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value settings that override the recipe")
    return parser.parse_args(argv)


def setup_logging(is_main: bool) -> None:
    import datasets

    datasets.disable_progress_bars()
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates, once per step.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                            category=FutureWarning)
    # peft 0.21 asks transformers 5.x for `is_gradient_checkpointing`, deprecated there, at every wrap.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def fault_point(info: DistInfo, where: str) -> None:
    """Test fault injection (see SIGKILL_AT and FAIL_AT); a no-op in real runs."""
    if SIGKILL_AT == where and info.is_main:
        os.kill(os.getpid(), signal.SIGKILL)
    if FAIL_AT == f"{where}:stall":
        time.sleep(600)
    if FAIL_AT == f"{where}:crash":
        raise RuntimeError(f"injected crash at {where} (LORADROP_TEST_FAIL_AT)")
    if FAIL_AT == where:
        raise InjectedFailure(f"injected failure at {where} (LORADROP_TEST_FAIL_AT)")


@dataclasses.dataclass
class Inputs:
    """Everything checked before heavy work starts."""

    modules: ModuleInfo
    tokenizer: Any
    attn_implementation: str
    base_model: dict
    plain_lora_params: int
    costs: ParamCosts  # what each structure trains, for loradrop.param_budget
    ds_config: dict
    resume: Optional[tuple[Path, ckpt.RunState]]
    # Filled by read_data, after each node's local rank 0 has tokenised into the cache.
    train_set: Optional[data_lib.TokenizedSet] = None
    eval_set: Optional[data_lib.TokenizedSet] = None
    sample: Optional[list[int]] = None  # indices of the sampling subset
    main_steps: int = 0  # train.max_steps, or train.num_epochs worth of steps


@dataclasses.dataclass
class Run:
    """What every stage of a run needs: settings, ranks, checked inputs, where results go."""

    cfg: config_lib.Config
    info: DistInfo
    inputs: Inputs
    out_dir: Path
    logger: MetricsLogger
    results: dict  # zero-shot and final eval, stage summaries: saved in checkpoints and summary.json
    wall_start: float
    pruner: Optional[Pruner] = None  # LoRAPrune's hooks and state in the main stage (prune.target_sparsity > 0)

    @property
    def resume_path(self) -> Optional[Path]:
        return self.inputs.resume[0] if self.inputs.resume else None

    @property
    def resumed(self) -> Optional[ckpt.RunState]:
        return self.inputs.resume[1] if self.inputs.resume else None

    def evaluate(self, engine: Any, desc: str, probe: Optional[dict] = None) -> dict:
        eval_set = self.inputs.eval_set
        if eval_set is None:
            return {}
        return evaluate(engine, eval_set, self.info, self.cfg.train.micro_batch_size,
                        self.inputs.tokenizer.pad_token_id, desc=desc, probe=probe)

    def micro_batches(self, indices: Any, seed: int) -> data_lib.MicroBatches:
        return micro_batches(self.cfg, self.info, self.inputs, indices, seed)

    def save_checkpoint(self, engine: Any, stage: str, step: int, batches: data_lib.MicroBatches,
                        selection: Optional[Selection], stats=None) -> None:
        state = ckpt.RunState(stage, step, batches.stream.position, self.info.world_size, config_lib.to_dict(self.cfg),
                              self.inputs.base_model, selection=json.loads(selection.to_json()) if selection else None,
                              results=self.results)
        name = ckpt.checkpoint_name(stage, step)
        pruner = self.pruner if stage == "main" else None
        ckpt.save_run_checkpoint(engine, self.out_dir, state, self.info, self.cfg.train.keep_last, stats=stats,
                                 on_point=lambda point: fault_point(self.info, f"{point}:{name}"),
                                 write_extra=(lambda d: write_prune_dir(d, pruner)) if pruner else None)


def micro_batches(cfg: config_lib.Config, info: DistInfo, inputs: Inputs, indices: Any, seed: int
                  ) -> data_lib.MicroBatches:
    """This rank's training micro-batches over ``indices`` of the training set (packed
    with data.packing; one row per micro-batch for flash-attn's varlen kernel)."""
    return data_lib.MicroBatches(inputs.train_set, indices, cfg.data, cfg.train.micro_batch_size, info.rank,
                                 info.world_size, seed, inputs.tokenizer.pad_token_id,
                                 one_row=inputs.attn_implementation == "flash_attention_2")


def check_inputs(cfg: config_lib.Config, info: DistInfo) -> Inputs:
    """Read and check every input: model config and target modules (on a weightless
    copy), attention kernel, DeepSpeed config, tokenizer, the checkpoint to resume from,
    and (rank 0) that output_dir is writable. Each node's local rank 0 also tokenises the
    data into the cache (read_data reads it on every rank). Runs on every rank; raises
    one of USER_ERRORS for bad input."""
    model_config = load_model_config(cfg.model)
    check_architecture(model_config, cfg.model.path)
    check_weight_files(cfg.model.path)  # headers only: missing shards, truncated files
    modules = describe_modules(model_config, cfg.lora.target_modules, cfg.model.trust_remote_code)
    attn = resolve_attn_implementation(cfg.model.attn_implementation, info.device.type, cfg.model.dtype)
    ds_config = load_ds_config(cfg, info.world_size, SizeHints.for_model(modules, cfg.lora.r))
    if not cfg.train.skip_memory_check:  # the estimate of launch/plan.py against this machine
        device_memory = (torch.cuda.get_device_properties(info.device).total_memory if info.device.type == "cuda"
                         else None)  # CPU ranks: every rank's tensors counted against the host's RAM
        problem = planner.check_memory(cfg, info.world_size, planner.ranks_per_node(info.world_size), device_memory,
                                       planner.host_memory_bytes(), attn_implementation=attn)
        if problem is not None:
            raise config_lib.ConfigError(problem)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code)
    check_tokenizer_fits(tokenizer, model_config, cfg.model.tokenizer or cfg.model.path)
    plain = modules.num_layers * sum(lora_param_count(i, o, cfg.lora.r) for i, o in modules.shapes.values())
    drop = cfg.loradrop
    costs = ParamCosts({m: lora_param_count(i, o, cfg.lora.r) for m, (i, o) in modules.shapes.items()},
                       modules.num_layers, drop.train_shared,
                       {"none": 0, "scalar": 1, "vector": cfg.lora.r}[drop.shared_scale])
    if drop.enabled:
        check_selection_request(drop.selection, drop.keep, drop.num_kept, drop.param_budget, drop.granularity,
                                modules.num_layers, list(cfg.lora.target_modules), costs)
    base = ckpt.base_model_identity(cfg.model.path, resolve_model_path(cfg.model.path))
    out_dir = Path(cfg.output_dir)
    resume = ckpt.find_resume_checkpoint(cfg.resume, out_dir, cfg.overwrite)
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
    fault_point(info, "inputs")
    return Inputs(modules, tokenizer, attn, base, plain, costs, ds_config, resume)


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


def write_marker(out_dir: Path) -> str:
    name = f".shared-check-{uuid.uuid4().hex}"
    (out_dir / name).write_text("")
    return name


def check_shared_output_dir(out_dir: Path, marker: str, info: DistInfo) -> None:
    if not (out_dir / marker).exists():
        raise config_lib.ConfigError(
            f"output_dir={out_dir} on {socket.gethostname()} (rank {info.rank}) is not the directory rank 0 writes: "
            "every rank writes its checkpoint shards there, so it must be on storage that all nodes share")


def data_view(inputs: Inputs) -> tuple:
    """What must be equal on every rank: the data's cache keys (content, tokenizer,
    settings), sizes, and the step count derived from them."""
    ev = inputs.eval_set
    return (inputs.train_set.cache_key, len(inputs.train_set), ev.cache_key if ev else None, len(ev) if ev else 0,
            len(inputs.sample), inputs.main_steps)


def setup(cfg: config_lib.Config, info: DistInfo, wall_start: float) -> Run:
    out_dir = Path(cfg.output_dir)
    if cfg.model.path.startswith(BUILTIN_PREFIX):  # one conversion per machine; the others wait
        run_on_every_rank(info, "model conversion", lambda: info.local_rank == 0 and prepare_builtin_model(
            cfg.model.path[len(BUILTIN_PREFIX):]), USER_ERRORS)
    if info.is_main:
        log.info("resolved config:\n%s", config_lib.dump_yaml(cfg))
        log.info("world size %d, device %s", info.world_size, info.device)
    inputs = run_on_every_rank(info, "input checks", lambda: check_inputs(cfg, info), USER_ERRORS)
    # Every rank writes its checkpoint shards into output_dir: rank 0 leaves a marker there
    # and every rank must see it (a node-local output_dir would fail at the first checkpoint).
    marker = run_on_every_rank(info, "output_dir marker", lambda: info.is_main and write_marker(out_dir), USER_ERRORS,
                               gather=True)[0]
    try:
        inputs = run_on_every_rank(info, "data", lambda: check_shared_output_dir(out_dir, marker, info)
                                   or read_data(cfg, info, inputs), USER_ERRORS)
    finally:
        if info.is_main:
            (out_dir / marker).unlink(missing_ok=True)
    # Every rank must see the same data: a node whose copy of a file (or tokenizer) differs
    # would index other rows and, with epochs or packing, run another number of steps.
    views = run_on_every_rank(info, "data agreement", lambda: data_view(inputs), USER_ERRORS, gather=True)
    differs = next((r for r, view in enumerate(views) if view != views[0]), None)
    if differs is not None:  # the same list on every rank: every rank stops here with this message
        raise data_lib.DataError(f"rank {differs} sees other data than rank 0 ({views[differs]} against {views[0]}): "
                                 "every node needs the same data files and tokenizer")
    if info.is_main:
        log.info("data: %d training examples, %s eval, sampling subset %d, main stage %d steps", len(inputs.train_set),
                 len(inputs.eval_set) if inputs.eval_set is not None else "no", len(inputs.sample), inputs.main_steps)
    state = inputs.resume[1] if inputs.resume else None
    if state is not None:
        log.info("resuming from %s (%s stage, step %d)", inputs.resume[0], state.stage, state.step)

    def prepare_output_dir() -> None:  # only now, with every input accepted, does rank 0 change output_dir
        if not info.is_main:
            return
        if state is not None:
            ckpt.truncate_metrics(out_dir, state.stage, state.step)
        elif cfg.overwrite:  # said so explicitly: the earlier run is moved aside, not deleted
            ckpt.move_run_aside(out_dir)
        write_text_atomic(out_dir / "config.yaml", config_lib.dump_yaml(cfg))

    run_on_every_rank(info, "output setup", prepare_output_dir, USER_ERRORS)
    logger = MetricsLogger(out_dir, enabled=info.is_main, report_to=cfg.train.report_to)
    logger.log_config(config_lib.to_dict(cfg))
    return Run(cfg, info, inputs, out_dir, logger,
               dict(state.results) if state else {}, wall_start)


def main(argv: list[str] | None = None) -> int:
    wall_start = time.perf_counter()
    args = parse_args(argv)

    # ---------------------------------------------------------------- 1. setup
    cfg = config_lib.load_config(resolve_recipe(args.config) if args.config else None, args.overrides)
    shipped = resolve_shipped_paths(cfg)  # ds_configs/, data/ of an installed package when not in the cwd
    info = distributed.init_distributed(cfg.dist.timeout_minutes)
    setup_logging(info.is_main)
    if shipped and info.is_main:
        log.info("shipped files: %s", "; ".join(shipped))
    run = setup(cfg, info, wall_start)
    resumed = run.resumed

    # ------------------------------------------------ 2-3. sampling and selection
    selection: Optional[Selection] = None
    base: Optional[torch.nn.Module] = None  # the frozen ZeRO-3-partitioned base (the sampling stage's, LoRA removed)
    hf_ds = None  # transformers' ZeRO-3 config for the model in use: alive as long as the model is
    warm_state: Optional[dict[str, torch.Tensor]] = None
    if resumed is not None and resumed.selection is not None:
        selection = Selection.from_dict(resumed.selection)
        if cfg.loradrop.warm_start and resumed.stage == "sampling":
            warm_state = adapter_as_module_state(run.resume_path / "adapter")
    elif cfg.loradrop.enabled:
        selection, base, hf_ds, warm_state = sampling_stage(run)
    if selection is not None:
        def write_selection() -> None:
            if info.is_main:
                write_text_atomic(run.out_dir / "selection.json", selection.to_json())
                kept = set(selection.kept)
                plot_importance(run.out_dir / "importance.png", selection.items, selection.importance,
                                [item in kept for item in selection.items], selection.threshold,
                                title=f"LoRA-drop {selection.granularity} importance (kept by {selection.method})")
                run.logger.log_artifact(run.out_dir / "selection.json")
                run.logger.log_artifact(run.out_dir / "importance.png")
                if selection.history:
                    plot_selection_history(run.out_dir / "selection_history.png", selection.items, selection.history)
                    run.logger.log_artifact(run.out_dir / "selection_history.png")

        run_on_every_rank(info, "selection output", write_selection, USER_ERRORS)

    # ----------------------------------------------------------- 4. rebuild
    main_steps = run.inputs.main_steps
    rebuild_start = time.perf_counter()
    if base is None:  # plain LoRA, or resumed after the selection: the one read of the base
        base, hf_ds = load_model(cfg.model, run.inputs.ds_config, info.device.type)
    plan = sharing_plan(selection) if selection is not None else None
    model, shared_users = build_main_lora(base, cfg.lora, cfg.seed + 1, plan, cfg.loradrop.train_shared, warm_state,
                                          shared_scale=cfg.loradrop.shared_scale)
    del base, warm_state
    if shared_users:
        log.info("shared LoRA users per module: %s", shared_users)
    trainable = trainable_parameter_count(model)
    run.results["trainable_params"] = trainable
    if selection is not None and selection.trainable_params not in (None, trainable):
        log.warning("the selection predicted %d trainable parameters, the model has %d", selection.trainable_params,
                    trainable)
    if info.is_main:
        log.info("trainable parameters: %s (plain LoRA: %s, %.1f%%)", format_count(trainable),
                 format_count(run.inputs.plain_lora_params), 100.0 * trainable / run.inputs.plain_lora_params)
    if cfg.prune.target_sparsity > 0:  # its hooks go on before DeepSpeed's (see loradrop_ds.prune_zero3)
        state = None
        if resumed is not None and resumed.stage == "main":
            state = load_state(run.resume_path)
            if state is None:  # pruning would restart from nothing in the middle of the schedule
                raise ckpt.CheckpointError(f"{run.resume_path} holds no prune/state.safetensors although "
                                           "prune.target_sparsity > 0; resume from a checkpoint this run wrote")
        run.pruner = Pruner(model, cfg.prune, list(cfg.lora.target_modules), Shape.of(load_model_config(cfg.model)),
                            main_steps, info.device, state=state)
        if info.is_main:
            log.info("LoRAPrune: target sparsity %.2f, score and mask updates after steps %s, exempt layers %s",
                     cfg.prune.target_sparsity, run.pruner.steps, run.pruner.exempt)
    engine = create_engine(model, run.inputs.ds_config, cfg.train.lr, cfg.train.weight_decay,
                           lr_lambda(cfg.train.lr_schedule, cfg.train.warmup_steps, main_steps,
                                     cfg.train.min_lr_ratio))
    del model
    run.results["rebuild_seconds"] = time.perf_counter() - rebuild_start
    batches = run.micro_batches(range(len(run.inputs.train_set)), cfg.seed + 1)
    start_step = 0
    if resumed is not None and resumed.stage == "main":
        restore_engine(run, engine, batches)
        start_step = resumed.step
    if "zero_shot" not in run.results:  # plain LoRA: B = 0, so this is the base model
        run.results["zero_shot"] = run.evaluate(engine, "zero-shot eval")
        run.logger.log({"stage": "zero_shot", **run.results["zero_shot"]}, step=0)
    if start_step == 0:
        run.logger.log({"stage": "main", "trainable_params": trainable,
                        "plain_lora_params": run.inputs.plain_lora_params}, step=0)

    # ------------------------------------------------------------ 5. main stage
    def after_main_step(step: int, loss: float) -> None:
        run.results["main_last_loss"] = loss
        if run.pruner is not None and step in run.pruner.steps:
            run.logger.log(run.pruner.update(step, info.world_size), step=step)
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == main_steps:
            run.save_checkpoint(engine, "main", step, batches, selection)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != main_steps:
            run.logger.log({"stage": "eval", **run.evaluate(engine, f"eval@{step}")}, step=step)
        fault_point(info, f"main:{step}")

    result = train_stage(engine, batches, main_steps, stage="main", info=info, logger=run.logger,
                         log_every=cfg.train.log_every, start_step=start_step, recorder=run.pruner,
                         on_step=after_main_step)
    run.results["main"] = {"steps": main_steps, "final_loss": run.results.get("main_last_loss"),
                           "seconds_this_process": result.seconds,
                           "tokens_per_s_per_rank": result.tokens_per_rank / max(result.seconds, 1e-9)}
    if run.pruner is not None:
        run.results["prune"] = run.pruner.summary()
        if info.is_main:
            log.info("LoRAPrune: %d of %d KV groups and %d of %d MLP channels per layer kept (layers %s exempt); "
                     "%s base parameters removed", min(run.results["prune"]["kept_groups"]), run.pruner.shape.num_kv_heads,
                     min(run.results["prune"]["kept_channels"]), run.pruner.shape.intermediate, run.pruner.exempt,
                     format_count(run.results["prune"]["base_params_removed"]))
            if run.pruner.exempt:
                log.info("LoRAPrune: exempt layers keep full width, and `launch/export.py --format pruned` writes every "
                         "layer at the widest layer's width: the exported model is no smaller (README: Export)")
    probe: dict | None = {} if cfg.train.save_probe_logits else None
    run.results["final"] = run.evaluate(engine, "final eval", probe=probe)  # masks applied: the pruned model
    run.logger.log({"stage": "eval", **run.results["final"]}, step=main_steps)

    # ------------------------------------------------------------------ 6. save
    save_outputs(run, engine, selection, probe)
    run.logger.close()
    release_engine(engine)
    del hf_ds
    return 0


def restore_engine(run: Run, engine: Any, batches: data_lib.MicroBatches) -> None:
    """Weights, optimizer, scheduler, RNG and data position from the checkpoint resumed.
    On the checkpoint's number of ranks: DeepSpeed's own per-rank shards, exactly. On
    another: its rank-independent full_state.pt, each rank's RNG seeded afresh, and the
    data position mapped to the same place in the same epoch order."""
    state, path, info = run.resumed, run.resume_path, run.info
    if state.world_size == info.world_size:
        ckpt.load_engine_state(engine, path)
        batches.stream.position = state.stream_position
    else:
        ckpt.load_full_state(engine, path)
        old_group = state.config["train"]["micro_batch_size"] * state.world_size
        batches.stream.position = ckpt.map_stream_position(state.stream_position, len(batches.stream.items),
                                                           old_group, batches.stream.group)
        log.info("resumed on %d ranks from a checkpoint of %d: data position %d -> %d", info.world_size,
                 state.world_size, state.stream_position, batches.stream.position)
    ckpt.restore_rng(path, info, state, run.cfg.seed)


def sampling_stage(run: Run) -> tuple[Selection, torch.nn.Module, Any, Optional[dict[str, torch.Tensor]]]:
    """Stages 2 and 3: train LoRA everywhere on the subset while recording LoRA output
    norms, then select. Every loradrop.auto_check_every steps the selection is computed
    from the statistics so far and recorded in its history; with sampling_steps=auto the
    stage ends once it has settled. Returns ``(selection, base, hf_ds_config, warm_state
    or None)``: ``base`` is the sampling model with its LoRA removed, still ZeRO-3
    partitioned, for the main stage to build on; the sampling engine, its optimizer and
    hooks are freed."""
    cfg, info, drop = run.cfg, run.info, run.cfg.loradrop
    resume_path, resumed = run.resume_path, run.resumed
    model, hf_ds = load_model(cfg.model, run.inputs.ds_config, info.device.type)  # the one read of the base
    model = add_lora(model, cfg.lora, cfg.seed)
    auto = drop.sampling_steps == "auto"
    max_steps = drop.auto_max_steps if auto else drop.sampling_steps
    engine = create_engine(model, run.inputs.ds_config, drop.sampling_lr or cfg.train.lr,
                           cfg.train.weight_decay, lr_lambda("constant", 0, max_steps, 1.0))
    recorder = ImportanceRecorder(model, cfg.lora.target_modules, info.device,
                                  record_grads=drop.selection == "grad_norm")
    batches = run.micro_batches(run.inputs.sample, cfg.seed)
    start_step = 0
    if resumed is not None:  # mid-sampling: weights, optimizer, data position, RNG and statistics
        restore_engine(run, engine, batches)
        recorder.stats = ckpt.load_rank_stats(resume_path, info, info.device, resumed.world_size)
        start_step = resumed.step
    else:
        # LoRA's B starts at zero, so this is the base model's zero-shot score.
        run.results["zero_shot"] = run.evaluate(engine, "zero-shot eval")
        run.logger.log({"stage": "zero_shot", **run.results["zero_shot"]}, step=0)
    # One entry per check, kept in the results so that checkpoints carry it (a resumed run
    # continues the same history and reaches the same decision).
    history: list[dict] = run.results.setdefault("sampling_history", [])

    def select(stats) -> Optional[Selection]:  # rank 0, on the all-reduced statistics
        return compute_selection(stats, drop.threshold, drop.granularity, method=drop.selection,
                                 param_scores=param_scores, num_kept=drop.num_kept, param_budget=drop.param_budget,
                                 costs=run.inputs.costs, keep=drop.keep, seed=cfg.seed)

    def check(step: int) -> bool:
        """The selection so far (every rank: two small collectives), recorded; True once it
        has settled. The first steps record zeros (B starts at 0): no selection yet."""
        nonlocal param_scores
        stats = distributed.all_reduce_stats(recorder.stats, info.device)
        param_scores = lora_param_scores(model, cfg.lora.target_modules) if drop.selection == "param_norm" else None
        now = run_on_every_rank(info, f"selection check at step {step}",
                                lambda: select(stats) if info.is_main and stats.sq_norm_sums.sum() > 0 else None,
                                USER_ERRORS, gather=True)[0]
        history.append({"step": step, "kept": now.kept if now else None,
                        "scores": (now.scores or now.raw_sums) if now else None})
        settled = selection_settled([h["kept"] for h in history if h["kept"] is not None], drop.auto_patience)
        return auto and settled

    param_scores = None

    def after_step(step: int, loss: float) -> bool:
        run.results["sampling_last_loss"] = loss
        stop = step % drop.auto_check_every == 0 and check(step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step != max_steps and not stop:
            run.save_checkpoint(engine, "sampling", step, batches, None, stats=recorder.stats)  # the end: below
        fault_point(info, f"sampling:{step}")
        return stop

    result = train_stage(engine, batches, max_steps, stage="sampling", info=info, logger=run.logger,
                         log_every=cfg.train.log_every, start_step=start_step, recorder=recorder, on_step=after_step)
    recorder.remove()
    steps = start_step + result.steps
    run.results["sampling"] = {"steps": steps, "final_loss": run.results.get("sampling_last_loss"),
                               "subset_size": len(run.inputs.sample), "seconds_this_process": result.seconds}
    if auto:
        run.results["sampling"]["settled"] = steps < max_steps
        if steps == max_steps:
            log.warning("the selection had not settled after loradrop.auto_max_steps=%d sampling steps; selecting "
                        "from the statistics so far (raise auto_max_steps to let it settle)", max_steps)

    # ---------------------------------------------------------- 3. selection
    stats = distributed.all_reduce_stats(recorder.stats, info.device)
    param_scores = lora_param_scores(model, cfg.lora.target_modules) if drop.selection == "param_norm" else None

    def final_select() -> Optional[Selection]:
        fault_point(info, "selection")
        if not info.is_main:
            return None
        selection = select(stats)
        final_scores = selection.scores or selection.raw_sums
        # Each check's scores too, so that other stopping rules can be replayed from selection.json.
        selection.history = [{"step": h["step"], "kept": h["kept"], "scores": h["scores"],
                              "rank_correlation": rank_correlation(h["scores"], final_scores) if h["scores"] else None}
                             for h in history]
        return selection

    # The exchange of outcomes carries rank 0's selection to every rank (the broadcast).
    selection = run_on_every_rank(info, "selection", final_select, USER_ERRORS, gather=True)[0]
    distributed.check_selection_agreement(selection, info)
    run.results.pop("sampling_history")  # now in selection.json
    log.info("kept %d of %d %ss by %s after %d sampling steps: layers %s", len(selection.kept), len(selection.items),
             selection.granularity, selection.method, steps, selection.kept_layers)
    run.save_checkpoint(engine, "sampling", steps, batches, selection, stats=recorder.stats)
    fault_point(info, f"selection:{steps}")
    warm_state = adapter_io.gather_lora_state(model) if drop.warm_start else None

    # 4. (first half) Free the engine, its optimizer state and hooks; keep the base. The
    # names are cleared rather than deleted: after_step above holds them in its closure.
    model = recorder = None
    base = strip_lora(release_engine(engine, keep_model=True))
    engine = None
    gc.collect()
    return selection, base, hf_ds, warm_state


def save_outputs(run: Run, engine: Any, selection: Optional[Selection], probe: Optional[dict]) -> None:
    """The adapter (gathered from the shards on every rank, written by rank 0), probe
    logits and summary.json; a failure on any rank stops every rank."""
    info = run.info
    adapter_state = adapter_io.gather_lora_state(engine.module, copy_here=info.is_main)  # collective

    def write() -> None:
        fault_point(info, "save")
        if not info.is_main:
            return
        adapter_io.save_adapter(engine.module, run.out_dir / "adapter", True, state=adapter_state)
        if run.pruner is not None:  # written aside, then moved into place whole
            staging = run.out_dir / f".{PRUNE_DIR}-tmp-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            write_prune_dir(staging, run.pruner)
            shutil.rmtree(run.out_dir / PRUNE_DIR, ignore_errors=True)
            os.replace(staging / PRUNE_DIR, run.out_dir / PRUNE_DIR)
            staging.rmdir()
        if probe:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in probe.items()}, run.out_dir / "probe_logits.safetensors")
        summary = {"world_size": info.world_size, "num_layers": run.inputs.modules.num_layers,
                   "plain_lora_params": run.inputs.plain_lora_params, **run.results,
                   "wall_seconds_this_process": time.perf_counter() - run.wall_start,
                   "resumed_from": str(run.resume_path) if run.resume_path else None}
        if selection is not None:
            summary["kept_layers"], summary["kept"] = selection.kept_layers, selection.kept
        write_text_atomic(run.out_dir / "summary.json", json.dumps(summary, indent=2))
        print_summary(summary)

    run_on_every_rank(info, "save", write, USER_ERRORS)


def print_summary(summary: dict) -> None:
    def acc(d: dict) -> str:
        return f"{d['eval_accuracy']:.1%}" if "eval_accuracy" in d else "n/a"

    zero, final = summary.get("zero_shot", {}), summary.get("final", {})
    lines = ["", "=== loradrop_ds run summary ==="]
    if zero or final:
        lines.append(f"accuracy: zero-shot {acc(zero)} -> final {acc(final)}   eval loss "
                     f"{zero.get('eval_loss', float('nan')):.4f} -> {final.get('eval_loss', float('nan')):.4f}")
    if "kept_layers" in summary:
        lines.append(f"kept layers ({len(summary['kept_layers'])} of {summary['num_layers']}): {summary['kept_layers']}")
    lines.append(f"trainable parameters: {format_count(summary['trainable_params'])} vs plain LoRA "
                 f"{format_count(summary['plain_lora_params'])} "
                 f"({100.0 * summary['trainable_params'] / summary['plain_lora_params']:.1f}%)")
    lines.append(f"wall time: {summary['wall_seconds_this_process']:.0f} s"
                 + (f" (resumed from {summary['resumed_from']})" if summary.get("resumed_from") else ""))
    print("\n".join(lines), flush=True)


def cli() -> None:
    """Run ``main`` and turn failures into exit codes: 2 and one line for bad input (on
    every rank, with the same message), 1 for anything unexpected. Anything else keeps
    its traceback (an error inside a collective: the other ranks end at the timeout)."""
    try:
        code = main()
    except RankFailure as e:  # a step failed on some rank; every rank is here with the same message
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2 if e.user_error else 1
    except USER_ERRORS as e:  # before the process group exists (the recipe): the same on every rank
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    distributed.exit_process(code)


if __name__ == "__main__":
    cli()
