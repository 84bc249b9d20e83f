#!/usr/bin/env python
"""LoRA-drop on DeepSpeed ZeRO-3, from a YAML recipe to a PEFT adapter.

    deepspeed --num_gpus N launch/train.py [--config recipes/NAME.yaml] [dotted.key=value ...]
    torchrun --nproc_per_node N launch/train.py [--config ...] [...]

With no --config the embedded default runs (SmolLM2-135M-Instruct on the WordNet
definition -> category task). The story, top to bottom:

1. setup       config, process group, checks of every input before any heavy work,
               and the checkpoint to resume from (resume=auto: the newest complete one)
2. sampling    LoRA in every layer, trained briefly on a subset while hooks record
               each LoRA's output norm; statistics all-reduced across ranks
3. selection   rank 0 keeps the layers carrying `threshold` of the importance and
               broadcasts the choice; every rank checks it holds the same one
4. rebuild     the sampling engine is freed; a fresh ZeRO-3 model whose other layers
               share one tied LoRA per module type
5. main        training on the full data, with evaluation
6. save        adapter/, selection.json, importance.png, metrics.jsonl, summary.json

Checkpoints are written every train.save_every steps and at the end of each stage.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from loradrop_ds import checkpoint, distributed  # noqa: E402
from loradrop_ds import config as config_lib
from loradrop_ds import data as data_lib
from loradrop_ds import run_checkpoint as ckpt  # noqa: E402
from loradrop_ds.engine import create_engine, load_ds_config, lr_lambda, release_engine  # noqa: E402
from loradrop_ds.importance import Selection, compute_selection, lora_param_count, sharing_plan  # noqa: E402
from loradrop_ds.lora import (  # noqa: E402
    ImportanceRecorder,
    adapter_as_module_state,
    add_lora,
    tie_shared_lora,
    trainable_parameter_count,
    warm_start_kept,
)
from loradrop_ds.metrics import MetricsLogger, format_count  # noqa: E402
from loradrop_ds.model import (  # noqa: E402
    BUILTIN_PREFIX,
    ModelError,
    ModuleInfo,
    describe_modules,
    load_model,
    load_model_config,
    load_tokenizer,
    prepare_builtin_model,
    resolve_model_path,
)
from loradrop_ds.plot import plot_importance  # noqa: E402
from loradrop_ds.training import evaluate, train_stage  # noqa: E402

log = logging.getLogger("loradrop_ds.train")
# Test-only fault injection: "STAGE:STEP" makes rank 0 SIGKILL itself after that step.
SIGKILL_AT = os.environ.get("LORADROP_TEST_SIGKILL_AT")


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
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Inputs:
    """Everything checked before heavy work starts."""

    modules: ModuleInfo
    tokenizer: Any
    train_set: data_lib.Tokenized
    eval_set: Optional[data_lib.Tokenized]
    sample: list[int]
    base_model: dict
    plain_lora_params: int


def check_inputs(cfg: config_lib.Config, info: distributed.DistInfo) -> Inputs:
    """Read and check every input: model config and target modules (on a weightless
    copy), tokenizer, data, batch feasibility. Raises ConfigError/DataError/ModelError."""
    modules = describe_modules(load_model_config(cfg.model), cfg.lora.target_modules, cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code)
    train_set = data_lib.tokenize_records(data_lib.load_records(cfg.data.train_file, "data.train_file"),
                                          tokenizer, cfg.data, "data.train_file")
    eval_set = None
    if cfg.data.eval_file:
        eval_records = data_lib.load_records(cfg.data.eval_file, "data.eval_file")
        eval_records = eval_records[: cfg.data.max_eval_examples or len(eval_records)]
        eval_set = data_lib.tokenize_records(eval_records, tokenizer, cfg.data, "data.eval_file",
                                             label_names=train_set.label_names or None)
    labels = [e.label for e in train_set.examples] if cfg.data.label_field else None
    sample = data_lib.draw_sample(len(train_set.examples), cfg.loradrop.sample_ratio, cfg.seed, labels)
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * info.world_size
    for name, size in (("the sampling subset", len(sample) if cfg.loradrop.enabled else None),
                       ("data.train_file", len(train_set.examples))):
        if size is not None and size < per_step:
            raise data_lib.DataError(
                f"{name} has {size} examples, fewer than one optimizer step needs ({per_step} = "
                f"micro_batch_size {cfg.train.micro_batch_size} x grad_accum {cfg.train.grad_accum} x "
                f"{info.world_size} ranks); raise loradrop.sample_ratio or lower the batch size")
    plain = modules.num_layers * sum(lora_param_count(i, o, cfg.lora.r) for i, o in modules.shapes.values())
    base = ckpt.base_model_identity(cfg.model.path, resolve_model_path(cfg.model.path))
    return Inputs(modules, tokenizer, train_set, eval_set, sample, base, plain)


def main(argv: list[str] | None = None) -> int:
    wall_start = time.perf_counter()
    args = parse_args(argv)

    # ---------------------------------------------------------------- 1. setup
    cfg = config_lib.load_config(args.config, args.overrides)  # typed and range-checked
    info = distributed.init_distributed()
    setup_logging(info.is_main)
    out_dir = Path(cfg.output_dir)
    ds_config = load_ds_config(cfg, info.world_size)
    if cfg.model.path.startswith(BUILTIN_PREFIX):
        if info.local_rank == 0:  # one conversion per machine; the others wait
            prepare_builtin_model(cfg.model.path[len(BUILTIN_PREFIX):])
        distributed.barrier()
    if info.is_main:
        log.info("resolved config:\n%s", config_lib.dump_yaml(cfg))
        log.info("world size %d, device %s", info.world_size, info.device)
    inputs = check_inputs(cfg, info)
    cfg_dict = config_lib.to_dict(cfg)
    resume = ckpt.find_resume_checkpoint(cfg.resume, out_dir)
    resume_path, state = resume if resume else (None, None)
    if state is not None:
        ckpt.check_compatible(state, cfg_dict, info.world_size, inputs.base_model, resume_path)
        log.info("resuming from %s (%s stage, step %d)", resume_path, state.stage, state.step)
    distributed.barrier()  # every rank has read the checkpoints before rank 0 touches the directory
    if info.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise config_lib.ConfigError(f"output_dir={out_dir} is not writable ({e.strerror}); choose another") from e
        if state is not None:
            ckpt.truncate_metrics(out_dir, state.stage, state.step)
        elif (out_dir / "metrics.jsonl").exists():  # a run that died before its first checkpoint
            os.replace(out_dir / "metrics.jsonl", out_dir / "metrics.jsonl.previous")
        write_text_atomic(out_dir / "config.yaml", config_lib.dump_yaml(cfg))
    logger = MetricsLogger(out_dir, enabled=info.is_main)
    results: dict = dict(state.results) if state else {}
    pad_id = inputs.tokenizer.pad_token_id

    def run_eval(engine, desc, probe=None):
        if inputs.eval_set is None:
            return {}
        return evaluate(engine, inputs.eval_set.examples, inputs.eval_set.label_token_ids, info,
                        cfg.train.micro_batch_size, pad_id, desc=desc, probe=probe)

    def new_state(stage: str, step: int, position: int, selection: Optional[Selection]) -> ckpt.RunState:
        return ckpt.RunState(stage, step, position, info.world_size, cfg_dict, inputs.base_model,
                             selection=json.loads(selection.to_json()) if selection else None, results=results)

    def maybe_die(stage: str, step: int) -> None:
        if SIGKILL_AT == f"{stage}:{step}" and info.is_main:
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------ 2-3. sampling and selection
    selection: Optional[Selection] = None
    warm_state: Optional[dict[str, torch.Tensor]] = None
    if state is not None and state.selection is not None:
        selection = Selection.from_dict(state.selection)
        if cfg.loradrop.warm_start and state.stage == "sampling":
            warm_state = adapter_as_module_state(resume_path / "adapter")
    elif cfg.loradrop.enabled:
        selection, warm_state = sampling_stage(cfg, info, inputs, ds_config, logger, results, run_eval, new_state,
                                               maybe_die, resume_path if state is not None else None, state)
        gc.collect()  # the sampling model is unreachable now: free it before loading again
    if selection is not None and info.is_main:
        write_text_atomic(out_dir / "selection.json", selection.to_json())
        kept = set(selection.kept)
        plot_importance(out_dir / "importance.png", selection.items, selection.importance,
                        [item in kept for item in selection.items], selection.threshold)

    # ----------------------------------------------------------- 4. rebuild
    model, hf_ds = load_model(cfg.model, ds_config, info.device.type)  # re-reads the base weights
    model = add_lora(model, cfg.lora, cfg.seed + 1)
    if selection is not None:
        plan = sharing_plan(selection)
        if warm_state is not None:
            warm_start_kept(model, warm_state, plan)
        shared_users = tie_shared_lora(model, plan, cfg.loradrop.train_shared)
        log.info("shared LoRA users per module: %s", shared_users)
    trainable = trainable_parameter_count(model)
    results["trainable_params"] = trainable
    if info.is_main:
        log.info("trainable parameters: %s (plain LoRA: %s, %.1f%%)", format_count(trainable),
                 format_count(inputs.plain_lora_params), 100.0 * trainable / inputs.plain_lora_params)
    engine = create_engine(model, ds_config, cfg.train.lr, cfg.train.weight_decay,
                           lr_lambda(cfg.train.lr_schedule, cfg.train.warmup_steps, cfg.train.max_steps,
                                     cfg.train.min_lr_ratio))
    stream = data_lib.BatchStream(range(len(inputs.train_set.examples)), cfg.train.micro_batch_size, info.rank,
                                  info.world_size, cfg.seed + 1)
    start_step = 0
    if state is not None and state.stage == "main":
        ckpt.load_engine_state(engine, resume_path)
        ckpt.restore_rng(resume_path, info)
        stream.position, start_step = state.stream_position, state.step
    if "zero_shot" not in results:  # plain LoRA: B = 0, so this is the base model
        results["zero_shot"] = run_eval(engine, "zero-shot eval")
        logger.log({"stage": "zero_shot", **results["zero_shot"]}, step=0)
    if start_step == 0:
        logger.log({"stage": "main", "trainable_params": trainable,
                    "plain_lora_params": inputs.plain_lora_params}, step=0)

    # ------------------------------------------------------------ 5. main stage
    def after_main_step(step: int, loss: float) -> None:
        results["main_last_loss"] = loss
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == cfg.train.max_steps:
            ckpt.save_run_checkpoint(engine, out_dir, new_state("main", step, stream.position, selection), info,
                                     cfg.train.keep_last)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.max_steps:
            logger.log({"stage": "eval", **run_eval(engine, f"eval@{step}")}, step=step)
        maybe_die("main", step)

    result = train_stage(engine, inputs.train_set.examples, stream, cfg.train.max_steps, stage="main", info=info,
                         pad_id=pad_id, logger=logger, log_every=cfg.train.log_every, start_step=start_step,
                         on_step=after_main_step)
    results["main"] = {"steps": cfg.train.max_steps, "final_loss": results.get("main_last_loss"),
                       "seconds_this_process": result.seconds,
                       "tokens_per_s_per_rank": result.tokens_per_rank / max(result.seconds, 1e-9)}
    probe: dict | None = {} if cfg.train.save_probe_logits else None
    results["final"] = run_eval(engine, "final eval", probe=probe)
    logger.log({"stage": "eval", **results["final"]}, step=cfg.train.max_steps)

    # ------------------------------------------------------------------ 6. save
    checkpoint.save_adapter(engine.module, out_dir / "adapter", info.is_main)
    if info.is_main:
        if probe:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in probe.items()}, out_dir / "probe_logits.safetensors")
        summary = {"world_size": info.world_size, "num_layers": inputs.modules.num_layers,
                   "plain_lora_params": inputs.plain_lora_params, **results,
                   "wall_seconds_this_process": time.perf_counter() - wall_start,
                   "resumed_from": str(resume_path) if resume_path else None}
        if selection is not None:
            summary["kept_layers"], summary["kept"] = selection.kept_layers, selection.kept
        write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
        print_summary(summary)
    logger.close()
    release_engine(engine)
    return 0


def sampling_stage(cfg, info, inputs: Inputs, ds_config, logger, results, run_eval, new_state, maybe_die,
                   resume_path: Optional[Path], state: Optional[ckpt.RunState]):
    """Stages 2 and 3: train LoRA everywhere on the subset while recording LoRA output
    norms, then select. Returns ``(selection, warm_state or None)``; the sampling engine
    and model are freed before returning."""
    model, hf_ds = load_model(cfg.model, ds_config, info.device.type)
    model = add_lora(model, cfg.lora, cfg.seed)
    steps = cfg.loradrop.sampling_steps
    engine = create_engine(model, ds_config, cfg.loradrop.sampling_lr or cfg.train.lr, cfg.train.weight_decay,
                           lr_lambda("constant", 0, steps, 1.0))
    recorder = ImportanceRecorder(model, cfg.lora.target_modules, info.device)
    stream = data_lib.BatchStream(inputs.sample, cfg.train.micro_batch_size, info.rank, info.world_size, cfg.seed)
    start_step = 0
    if resume_path is not None:  # mid-sampling: weights, optimizer, data position, RNG and statistics
        ckpt.load_engine_state(engine, resume_path)
        ckpt.restore_rng(resume_path, info)
        recorder.stats = ckpt.load_rank_stats(resume_path, info, info.device)
        stream.position, start_step = state.stream_position, state.step
    else:
        # LoRA's B starts at zero, so this is the base model's zero-shot score.
        results["zero_shot"] = run_eval(engine, "zero-shot eval")
        logger.log({"stage": "zero_shot", **results["zero_shot"]}, step=0)

    def after_step(step: int, loss: float) -> None:
        results["sampling_last_loss"] = loss
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step != steps:  # the end is saved below
            ckpt.save_run_checkpoint(engine, Path(cfg.output_dir), new_state("sampling", step, stream.position, None),
                                     info, cfg.train.keep_last, stats=recorder.stats)
        maybe_die("sampling", step)

    result = train_stage(engine, inputs.train_set.examples, stream, steps, stage="sampling", info=info,
                         pad_id=inputs.tokenizer.pad_token_id, logger=logger, log_every=cfg.train.log_every,
                         start_step=start_step, recorder=recorder, on_step=after_step)
    recorder.remove()
    results["sampling"] = {"steps": steps, "final_loss": results.get("sampling_last_loss"),
                           "subset_size": len(inputs.sample), "seconds_this_process": result.seconds}

    # ---------------------------------------------------------- 3. selection
    stats = distributed.all_reduce_stats(recorder.stats, info.device)
    selection = compute_selection(stats, cfg.loradrop.threshold, cfg.loradrop.granularity) if info.is_main else None
    selection = distributed.broadcast_selection(selection, info)
    distributed.check_selection_agreement(selection, info)
    log.info("kept %d of %d %ss: layers %s", len(selection.kept), len(selection.items), selection.granularity,
             selection.kept_layers)
    ckpt.save_run_checkpoint(engine, Path(cfg.output_dir), new_state("sampling", steps, stream.position, selection),
                             info, cfg.train.keep_last, stats=recorder.stats)
    maybe_die("selection", steps)
    warm_state = checkpoint.gather_lora_state(model) if cfg.loradrop.warm_start else None

    # Free the sampling engine; its model goes with this frame (collected by the caller).
    release_engine(engine)
    return selection, warm_state


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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (config_lib.ConfigError, data_lib.DataError, ModelError, ckpt.CheckpointError) as e:
        # Bad input: one clear line, no traceback, exit 2. Everything else keeps its traceback.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
