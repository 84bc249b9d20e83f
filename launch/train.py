#!/usr/bin/env python
"""LoRA-drop on DeepSpeed ZeRO-3, from a YAML recipe to a PEFT adapter.

    deepspeed --num_gpus N launch/train.py [--config recipes/NAME.yaml] [dotted.key=value ...]
    torchrun --nproc_per_node N launch/train.py [--config ...] [...]

With no --config the embedded default runs (SmolLM2-135M-Instruct on the WordNet
definition -> category task). The story, top to bottom, one function each:

1. setup       config, process group, every input checked on every rank before any
               heavy work (loradrop_ds.preflight), and the checkpoint to resume from
2. sampling    LoRA in every layer, trained briefly on a subset while hooks record each
               LoRA's output norm; the selection so far is checked every few steps
               (sampling_steps=auto: the stage ends once it has settled)
3. selection   statistics all-reduced; rank 0 keeps the layers carrying `threshold` of
               the importance (or what fits `param_budget`, or a baseline's choice) and
               sends it to every rank, which checks it holds the same one
               (selection=share_all keeps none and skips the sampling stage)
4. rebuild     the sampling engine is released but its ZeRO-3-partitioned base kept; its
               LoRA is replaced by fresh kept LoRAs and one shared LoRA per module type,
               and a new engine is built on the same base (no second read of it)
5. main        training on the full data, with checkpoints, evaluations and LoRAPrune's
               mask updates between steps
6. save        adapter/, selection.json, importance.png, metrics.jsonl, summary.json

Any step that can fail on one rank runs in distributed.run_on_every_rank, so all ranks
stop together with the same message: exit code 2 and one line for bad input. A signal in
train.preempt_signals (SIGTERM, SIGUSR1) stops every rank at the next step boundary with a
checkpoint: exit code 75 (loradrop_ds.preemption; the same command resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from loradrop_ds import adapter_io, distributed, preemption
from loradrop_ds import config as config_lib
from loradrop_ds import data as data_lib
from loradrop_ds import run_checkpoint as ckpt
from loradrop_ds.atomic import atomic_write_file, atomic_write_text
from loradrop_ds.cli import load_recipe
from loradrop_ds.deepspeed_private import release_engine
from loradrop_ds.disk_full import disk_full_reported
from loradrop_ds.distributed import RankFailure, run_on_every_rank
from loradrop_ds.engine import create_engine, lr_lambda, set_matmul_precision
from loradrop_ds.errors import USER_ERRORS
from loradrop_ds.faults import fault_point
from loradrop_ds.importance import (
    Selection,
    compute_selection,
    rank_correlation,
    sampling_settled,
    share_all_selection,
    sharing_plan,
)
from loradrop_ds.lora import (
    ImportanceRecorder,
    adapter_as_module_state,
    add_lora,
    build_main_lora,
    lora_param_scores,
    strip_lora,
    trainable_parameter_count,
)
from loradrop_ds.metrics import MetricsLogger, format_count, setup_logging, summary_text
from loradrop_ds.model import load_model
from loradrop_ds.plot import write_selection_files
from loradrop_ds.preflight import preflight
from loradrop_ds.prune_files import PRUNE_DIR
from loradrop_ds.prune_zero3 import pruner_for_run, write_prune_dir
from loradrop_ds.run_context import Run

log = logging.getLogger("loradrop_ds.train")


@dataclasses.dataclass
class Sampling:
    """The sampling stage's engine and statistics, until the selection is made."""

    model: torch.nn.Module
    engine: Any
    recorder: ImportanceRecorder
    batches: data_lib.MicroBatches
    steps: int = 0
    history: list = dataclasses.field(default_factory=list)  # each check: {"step", "kept", "scores"}
    preempted: bool = False  # the stage ended at a stop signal: stop once its end checkpoint is written


# ---------------------------------------------------------------------- 1. setup
def setup(argv: Optional[list[str]]) -> Run:
    wall_start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (default: the embedded default recipe)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value settings that override the recipe")
    args = parser.parse_args(argv)
    cfg, shipped = load_recipe(args.config, args.overrides)  # ds_configs/, data/ shipped when not in the cwd
    # From here a stop signal only sets a flag, read at the first step boundary (the setup,
    # the model's load and the zero-shot eval carry on).
    preemption.install(cfg.train.preempt_signals)
    info = distributed.init_distributed(cfg.dist.timeout_minutes)
    setup_logging(info.is_main)
    set_matmul_precision(cfg.train.tf32, info.device.type)  # before any model is built
    if info.is_main:
        if shipped:
            log.info("shipped files: %s", "; ".join(shipped))
        log.info("resolved config:\n%s", config_lib.dump_yaml(cfg))
        log.info("world size %d, device %s", info.world_size, info.device)
    inputs = preflight(cfg, info)
    if info.is_main:  # a marker an earlier, preempted run left: this run takes over from it
        preemption.clear_marker(Path(cfg.output_dir))
    logger = MetricsLogger(cfg.output_dir, enabled=info.is_main, report_to=cfg.train.report_to)
    logger.log_config(config_lib.to_dict(cfg))
    results = dict(inputs.resume[1].results) if inputs.resume else {}
    run = Run(cfg, info, inputs, logger, results, wall_start)
    if info.is_main:
        peak = run.peak_flops
        log.info("throughput: model FLOPs %s; MFU against %s", run.step_flops.convention,
                 f"{peak / 1e12:.1f} TFLOP/s" if peak else "no known peak (set train.peak_tflops for an MFU)")
    return run


# ------------------------------------------------------------------- 2. sampling
def sampling_stage(run: Run) -> Sampling:
    """LoRA everywhere, trained on the subset while the recorder sums each LoRA's output
    norm; every loradrop.auto_check_every steps the selection so far is recorded, and with
    sampling_steps=auto the stage ends once it has settled."""
    cfg, info, drop = run.cfg, run.info, run.cfg.loradrop
    model, run.hf_ds = load_model(cfg.model, run.inputs.ds_config, info.device.type)  # the one read of the base
    model = add_lora(model, cfg.lora, cfg.seed)
    auto = drop.sampling_steps == "auto"
    max_steps = drop.auto_max_steps if auto else drop.sampling_steps
    engine = create_engine(model, run.inputs.ds_config, drop.sampling_lr or cfg.train.lr, cfg.train.weight_decay,
                           lr_lambda("constant", 0, max_steps, 1.0))
    recorder = ImportanceRecorder(model, cfg.lora.target_modules, info.device, record_grads=drop.selection == "grad_norm")
    batches = run.micro_batches(run.inputs.sample, cfg.seed)
    sampling = Sampling(model, engine, recorder, batches, run.resume_stage("sampling", engine, batches))
    if sampling.steps > 0:  # the statistics so far, as the checkpoint holds them
        recorder.stats = ckpt.load_rank_stats(run.resume_path, info, info.device, run.resumed.world_size)
    else:  # LoRA's B starts at zero, so this is the base model's zero-shot score
        run.results["zero_shot"] = run.evaluate(engine, "zero-shot eval")
        run.logger.log({"stage": "zero_shot", **run.results["zero_shot"]}, step=0)
    # Kept in the results, so checkpoints carry it: a resumed run reaches the same decision.
    sampling.history = run.results.setdefault("sampling_history", [])
    stage = run.training_stage(engine, batches, max_steps, "sampling", sampling.steps, recorder)
    settled = False
    for step, loss in stage:
        sampling.steps = step
        run.results["sampling_last_loss"] = loss
        if step % drop.auto_check_every == 0:
            now = current_selection(run, sampling, f"selection check at step {step}")
            sampling.history.append({"step": step, "kept": now.kept if now else None,
                                     "scores": (now.scores or now.raw_sums) if now else None})
            settled = auto and sampling_settled(sampling.history, drop.auto_stop, drop.auto_patience,
                                                drop.auto_min_rank_correlation)
            if settled:
                break
        if ((cfg.train.save_every and step % cfg.train.save_every == 0) or stage.preempted) and step != max_steps:
            run.save_checkpoint(engine, "sampling", step, batches, None, stats=recorder.stats)  # the end: below
    # Preempted before the stage's end: stop at the checkpoint just written (with the partial
    # statistics). At its end (the last step, or settled), the end checkpoint with the
    # selection is the one to stop at (select_layers, then main()).
    sampling.preempted = stage.preempted
    if stage.preempted and not settled and sampling.steps != max_steps:
        run.stop_for_preemption("sampling", sampling.steps)
    recorder.remove()
    run.results["sampling"] = {"steps": sampling.steps, "final_loss": run.results.get("sampling_last_loss"),
                               "subset_size": len(run.inputs.sample), "seconds_this_process": stage.result().seconds,
                               **run.stage_rates(stage)}
    if auto:
        run.results["sampling"]["settled"] = sampling.steps < max_steps
        if sampling.steps == max_steps:
            log.warning("the selection had not settled after loradrop.auto_max_steps=%d sampling steps; selecting "
                        "from the statistics so far (raise auto_max_steps to let it settle)", max_steps)
    return sampling


def current_selection(run: Run, sampling: Sampling, step_name: str, final: bool = False) -> Optional[Selection]:
    """The selection from the statistics so far, on every rank: the statistics are
    all-reduced, rank 0 selects, and the exchange of outcomes carries its selection to
    every rank. A check before any output was recorded (B starts at 0) gives None."""
    drop, info = run.cfg.loradrop, run.info
    stats = distributed.all_reduce_stats(sampling.recorder.stats, info.device)
    param_scores = (lora_param_scores(sampling.model, run.cfg.lora.target_modules) if drop.selection == "param_norm"
                    else None)

    def select() -> Optional[Selection]:
        if not info.is_main or (not final and stats.sq_norm_sums.sum() == 0):
            return None
        return compute_selection(stats, drop.threshold, drop.granularity, method=drop.selection,
                                 param_scores=param_scores, num_kept=drop.num_kept, param_budget=drop.param_budget,
                                 costs=run.inputs.costs, keep=drop.keep, seed=run.cfg.seed)

    return run_on_every_rank(info, step_name, select, USER_ERRORS, gather=True)[0]


# ------------------------------------------------------------------ 3. selection
def select_layers(run: Run, sampling: Sampling) -> Selection:
    """The final selection, the same on every rank, with each check's scores beside it (so
    other stopping rules can be replayed from selection.json), and its checkpoint."""
    selection = current_selection(run, sampling, "selection", final=True)
    final_scores = selection.scores or selection.raw_sums
    selection.history = [{**h, "rank_correlation": rank_correlation(h["scores"], final_scores) if h["scores"] else None}
                         for h in run.results.pop("sampling_history")]
    distributed.check_selection_agreement(selection, run.info)
    log.info("kept %d of %d %ss by %s after %d sampling steps: layers %s", len(selection.kept), len(selection.items),
             selection.granularity, selection.method, sampling.steps, selection.kept_layers)
    run.save_checkpoint(sampling.engine, "sampling", sampling.steps, sampling.batches, selection,
                        stats=sampling.recorder.stats)
    return selection


def share_all(run: Run) -> Selection:
    """loradrop.selection=share_all: every layer uses the shared LoRA; no sampling stage."""
    drop = run.cfg.loradrop
    selection = share_all_selection(run.inputs.dims.num_layers, run.cfg.lora.target_modules, drop.granularity,
                                    drop.threshold, run.inputs.costs)
    log.info("share_all: all %d layers use one shared LoRA per module type (no sampling stage)", selection.num_layers)
    return selection


def write_selection(run: Run, selection: Selection) -> None:
    """selection.json, importance.png and selection_history.png, also sent to the trackers."""
    def write() -> None:
        if run.info.is_main:
            for path in write_selection_files(run.out_dir, selection):
                run.logger.log_artifact(path)

    run_on_every_rank(run.info, "selection output", write, USER_ERRORS)


# -------------------------------------------------------------------- 4. rebuild
def rebuild(run: Run, selection: Optional[Selection], base: Optional[torch.nn.Module],
            warm_state: Optional[dict[str, torch.Tensor]]) -> Any:
    """The main stage's engine: kept LoRAs and one tied shared LoRA per module type on
    ``base`` (the sampling stage's, LoRA removed), or on a fresh read of the base (plain
    LoRA, or resumed after the selection)."""
    cfg, info, rebuild_start = run.cfg, run.info, time.perf_counter()
    if base is None:
        base, run.hf_ds = load_model(cfg.model, run.inputs.ds_config, info.device.type)
    model, shared_users = build_main_lora(base, cfg.lora, cfg.seed + 1, sharing_plan(selection) if selection else None,
                                          cfg.loradrop.train_shared, warm_state, shared_scale=cfg.loradrop.shared_scale)
    trainable = run.results["trainable_params"] = trainable_parameter_count(model)
    if shared_users:
        log.info("shared LoRA users per module: %s", shared_users)
    if selection is not None and selection.trainable_params not in (None, trainable):
        log.warning("the selection predicted %d trainable parameters, the model has %d", selection.trainable_params,
                    trainable)
    if info.is_main:
        log.info("trainable parameters: %s (plain LoRA: %s, %.1f%%)", format_count(trainable),
                 format_count(run.inputs.plain_lora_params), 100.0 * trainable / run.inputs.plain_lora_params)
    if cfg.prune.target_sparsity > 0:  # its hooks go on before DeepSpeed's (see loradrop_ds.prune_zero3)
        resumed_main = run.resumed is not None and run.resumed.stage == "main"
        run.pruner = pruner_for_run(model, cfg, run.inputs.dims, run.inputs.main_steps, info.device,
                                    run.resume_path if resumed_main else None)
    engine = create_engine(model, run.inputs.ds_config, cfg.train.lr, cfg.train.weight_decay,
                           lr_lambda(cfg.train.lr_schedule, cfg.train.warmup_steps, run.inputs.main_steps,
                                     cfg.train.min_lr_ratio))
    run.results["rebuild_seconds"] = time.perf_counter() - rebuild_start
    return engine


# ----------------------------------------------------------------------- 5. main
def main_stage(run: Run, engine: Any, selection: Optional[Selection]) -> Optional[dict]:
    """Training on the full data; between steps, in this order: LoRAPrune's mask update, the
    checkpoint, the evaluation. Returns the probe (the first eval batch and its logits) if asked."""
    cfg, info, main_steps = run.cfg, run.info, run.inputs.main_steps
    batches = run.micro_batches(range(len(run.inputs.train_set)), cfg.seed + 1)
    start_step = run.resume_stage("main", engine, batches)
    if "zero_shot" not in run.results:  # plain LoRA: B = 0, so this is the base model
        run.results["zero_shot"] = run.evaluate(engine, "zero-shot eval")
        run.logger.log({"stage": "zero_shot", **run.results["zero_shot"]}, step=0)
    if start_step == 0:
        run.logger.log({"stage": "main", "trainable_params": run.results["trainable_params"],
                        "plain_lora_params": run.inputs.plain_lora_params}, step=0)
    stage = run.training_stage(engine, batches, main_steps, "main", start_step, run.pruner)
    for step, loss in stage:
        run.results["main_last_loss"] = loss
        if run.pruner is not None and step in run.pruner.steps:
            run.logger.log(run.pruner.update(step, info.world_size), step=step)
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == main_steps or stage.preempted:
            run.save_checkpoint(engine, "main", step, batches, selection)
        # A stopping run still evaluates here when due: metrics.jsonl keeps the records up to
        # the checkpoint on resume, so it then reads as the uninterrupted run's.
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != main_steps:
            run.logger.log({"stage": "eval", **run.evaluate(engine, f"eval@{step}")}, step=step)
    if stage.preempted:  # the stage ended after this step (the last one too: the final eval and save are left)
        run.stop_for_preemption("main", step)
    result = stage.result()
    run.results["main"] = {"steps": main_steps, "final_loss": run.results.get("main_last_loss"),
                           "seconds_this_process": result.seconds, **run.stage_rates(stage)}
    if run.pruner is not None:
        run.results["prune"] = run.pruner.summary()
        if info.is_main:
            run.pruner.log_summary(run.results["prune"])
    probe: Optional[dict] = {} if cfg.train.save_probe_logits else None
    run.results["final"] = run.evaluate(engine, "final eval", probe=probe)  # masks applied: the pruned model
    run.logger.log({"stage": "eval", **run.results["final"]}, step=main_steps)
    return probe


# ----------------------------------------------------------------------- 6. save
def save(run: Run, engine: Any, selection: Optional[Selection], probe: Optional[dict]) -> None:
    """The adapter (gathered from the shards on every rank, written by rank 0), LoRAPrune's
    masks, probe logits and summary.json; a failure on any rank stops every rank. A full disk
    is one line on every rank (exit 2), and what this save wrote is removed again, so that
    the run reads as unfinished and resume=auto redoes the final eval and save from the
    last step's checkpoint; each file is written atomically, so nothing is left half-written."""
    info = run.info
    adapter_state = adapter_io.gather_lora_state(engine.module, copy_here=info.is_main)  # collective
    outputs = [run.out_dir / name for name in ("adapter", PRUNE_DIR, "probe_logits.safetensors", "summary.json")]

    def write() -> None:
        if not info.is_main:
            return
        new = [p for p in outputs if not p.exists()]
        try:
            with disk_full_reported(run.out_dir, lambda: ckpt.disk_full_fix(run.out_dir)):
                write_outputs()
        except Exception:
            for path in new:  # summary.json or adapter/ would mark the run finished: resume=auto refuses it
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            raise

    def write_outputs() -> None:
        fault_point(info, "adapter", run.out_dir / "adapter")
        adapter_io.save_adapter(engine.module, run.out_dir / "adapter", True, state=adapter_state)
        if run.pruner is not None:
            write_prune_dir(run.out_dir, run.pruner)
        if probe:
            from safetensors.torch import save

            probe_bytes = save({k: v.contiguous() for k, v in probe.items()})
            atomic_write_file(run.out_dir / "probe_logits.safetensors", lambda f: f.write(probe_bytes))
        summary = {"world_size": info.world_size, "num_layers": run.inputs.dims.num_layers,
                   "plain_lora_params": run.inputs.plain_lora_params, **run.results,
                   "wall_seconds_this_process": time.perf_counter() - run.wall_start,
                   "resumed_from": str(run.resume_path) if run.resume_path else None}
        if selection is not None:
            summary["kept_layers"], summary["kept"] = selection.kept_layers, selection.kept
        fault_point(info, "summary", run.out_dir / "summary.json")
        atomic_write_text(run.out_dir / "summary.json", json.dumps(summary, indent=2))
        print(summary_text(summary), flush=True)

    run_on_every_rank(info, "save", write, USER_ERRORS)


def main(argv: Optional[list[str]] = None) -> int:
    run = setup(argv)
    selection, base, warm_state = None, None, None
    if run.resumed is not None and run.resumed.selection is not None:  # resumed after the selection
        selection = Selection.from_dict(run.resumed.selection)
        if run.cfg.loradrop.warm_start and run.resumed.stage == "sampling":
            warm_state = adapter_as_module_state(run.resume_path / "adapter")
    elif run.cfg.loradrop.enabled and run.cfg.loradrop.selection == "share_all":
        selection = share_all(run)
    elif run.cfg.loradrop.enabled:
        sampling = sampling_stage(run)
        selection = select_layers(run, sampling)
        if sampling.preempted:  # at the stage's last step: its end checkpoint, with the selection, is written
            run.stop_for_preemption("sampling", sampling.steps)
        warm_state = adapter_io.gather_lora_state(sampling.model) if run.cfg.loradrop.warm_start else None
        # Free the engine, its optimizer state and hooks; keep the ZeRO-3-partitioned base.
        base = strip_lora(release_engine(sampling.engine, keep_model=True))
        del sampling
        gc.collect()
    if selection is not None:
        write_selection(run, selection)
    engine = rebuild(run, selection, base, warm_state)
    del base, warm_state
    probe = main_stage(run, engine, selection)
    save(run, engine, selection, probe)
    if preemption.requested():
        log.warning("stop signal(s) %s after the last step boundary: the run finished instead",
                    ", ".join(preemption.received()))
    run.logger.close()
    release_engine(engine)
    return 0


def run_cli(argv: Optional[list[str]] = None) -> int:
    """Run ``main`` and turn failures into exit codes: 2 and one line for bad input (on
    every rank, with the same message), 1 for anything unexpected, ``preemption.EXIT_CODE``
    (75) for a run stopped by a signal with its checkpoint written. Anything else keeps its
    traceback (an error inside a collective: the other ranks end at the timeout)."""
    try:
        return main(argv)
    except preemption.Preempted as e:  # every rank is here, after the same step
        signals = preemption.received()  # repeats, e.g. during the checkpoint write, changed nothing
        print(f"preempted: {e}; exit code {preemption.EXIT_CODE}; signals on this rank: "
              f"{', '.join(signals) if signals else 'none (another rank was signalled)'}; run the same command to "
              "resume", file=sys.stderr, flush=True)
        return preemption.EXIT_CODE
    except RankFailure as e:  # a step failed on some rank; every rank is here with the same message
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2 if e.user_error else 1
    except USER_ERRORS as e:  # before the process group exists (the recipe): the same on every rank
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def cli() -> None:
    distributed.exit_process(run_cli())


if __name__ == "__main__":
    cli()
