#!/usr/bin/env python
"""LoRA-drop on DeepSpeed ZeRO-3, from a YAML recipe to a PEFT adapter.

    deepspeed --num_gpus N launch/train.py [--config recipes/NAME.yaml] [dotted.key=value ...]
    torchrun --nproc_per_node N launch/train.py [--config ...] [...]

With no --config the embedded default runs (SmolLM2-135M-Instruct on the WordNet
definition -> category task). The story, top to bottom:

1. setup       config, process group, checks of every input before any heavy work
2. sampling    LoRA in every layer, trained briefly on a subset while hooks record
               each LoRA's output norm; statistics all-reduced across ranks
3. selection   rank 0 keeps the layers carrying `threshold` of the importance and
               broadcasts the choice; every rank checks it holds the same one
4. rebuild     the sampling engine is freed; a fresh ZeRO-3 model whose other layers
               share one tied LoRA per module type
5. main        training on the full data, with evaluation
6. save        adapter/, selection.json, importance.png, metrics.jsonl, summary.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from loradrop_ds import checkpoint, config as config_lib, data as data_lib, distributed  # noqa: E402
from loradrop_ds.engine import create_engine, load_ds_config, lr_lambda, release_engine  # noqa: E402
from loradrop_ds.importance import compute_selection, lora_param_count, sharing_plan  # noqa: E402
from loradrop_ds.lora import ImportanceRecorder, add_lora, tie_shared_lora, trainable_parameter_count  # noqa: E402
from loradrop_ds.metrics import MetricsLogger, format_count  # noqa: E402
from loradrop_ds.model import (  # noqa: E402
    BUILTIN_PREFIX,
    ModelError,
    describe_modules,
    load_model,
    load_model_config,
    load_tokenizer,
    prepare_builtin_model,
)
from loradrop_ds.plot import plot_importance  # noqa: E402
from loradrop_ds.training import evaluate, train_stage  # noqa: E402

log = logging.getLogger("loradrop_ds.train")


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

    # Every input is checked here, before any weights are read or engines built.
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
    examples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * info.world_size
    labels = [e.label for e in train_set.examples] if cfg.data.label_field else None
    sample = data_lib.draw_sample(len(train_set.examples), cfg.loradrop.sample_ratio, cfg.seed, labels)
    for name, size in (("the sampling subset", len(sample) if cfg.loradrop.enabled else None),
                       ("data.train_file", len(train_set.examples))):
        if size is not None and size < examples_per_step:
            raise data_lib.DataError(
                f"{name} has {size} examples, fewer than one optimizer step needs ({examples_per_step} = "
                f"micro_batch_size {cfg.train.micro_batch_size} x grad_accum {cfg.train.grad_accum} x "
                f"{info.world_size} ranks); raise loradrop.sample_ratio or lower the batch size")
    pad_id = tokenizer.pad_token_id
    plain_lora_params = modules.num_layers * sum(
        lora_param_count(i, o, cfg.lora.r) for i, o in modules.shapes.values())
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "config.yaml", config_lib.dump_yaml(cfg))
    logger = MetricsLogger(out_dir, enabled=info.is_main)
    summary: dict = {"world_size": info.world_size, "num_layers": modules.num_layers,
                     "plain_lora_params": plain_lora_params}

    def run_eval(engine, desc, probe=None):
        if eval_set is None:
            return {}
        return evaluate(engine, eval_set.examples, eval_set.label_token_ids, info,
                        cfg.train.micro_batch_size, pad_id, desc=desc, probe=probe)

    # ------------------------------------------------------- 2. sampling stage
    selection, warm_state = None, None
    if cfg.loradrop.enabled:
        model, hf_ds = load_model(cfg.model, ds_config, info.device.type)
        model = add_lora(model, cfg.lora, cfg.seed)
        sampling_lr = cfg.loradrop.sampling_lr or cfg.train.lr
        engine = create_engine(model, ds_config, sampling_lr, cfg.train.weight_decay,
                               lr_lambda("constant", 0, cfg.loradrop.sampling_steps, 1.0))
        # LoRA's B starts at zero, so this is the base model's zero-shot score.
        summary["zero_shot"] = run_eval(engine, "zero-shot eval")
        logger.log({"stage": "zero_shot", **summary["zero_shot"]}, step=0)
        recorder = ImportanceRecorder(model, cfg.lora.target_modules, info.device)
        stream = data_lib.BatchStream(sample, cfg.train.micro_batch_size, info.rank, info.world_size, cfg.seed)
        result = train_stage(engine, train_set.examples, stream, cfg.loradrop.sampling_steps, stage="sampling",
                             info=info, pad_id=pad_id, logger=logger, log_every=cfg.train.log_every,
                             recorder=recorder)
        recorder.remove()
        summary["sampling"] = {"steps": result.steps, "final_loss": result.losses[-1], "seconds": result.seconds,
                               "subset_size": len(sample)}

        # --------------------------------------------------- 3. selection
        stats = distributed.all_reduce_stats(recorder.stats, info.device)
        if info.is_main:
            selection = compute_selection(stats, cfg.loradrop.threshold, cfg.loradrop.granularity)
        selection = distributed.broadcast_selection(selection, info)
        distributed.check_selection_agreement(selection, info)
        if info.is_main:
            write_text_atomic(out_dir / "selection.json", selection.to_json())
            kept = set(selection.kept)
            plot_importance(out_dir / "importance.png", selection.items, selection.importance,
                            [item in kept for item in selection.items], selection.threshold)
            log.info("kept %d of %d %ss: layers %s", len(selection.kept), len(selection.items),
                     selection.granularity, selection.kept_layers)
        if cfg.loradrop.warm_start:
            warm_state = checkpoint.gather_lora_state(model)

        # ----------------------------------------------------- 4. rebuild
        # Free the sampling engine and model completely before loading again.
        release_engine(engine)
        del engine, model, recorder, hf_ds
        gc.collect()

    model, hf_ds = load_model(cfg.model, ds_config, info.device.type)  # re-reads the base weights
    model = add_lora(model, cfg.lora, cfg.seed + 1)
    if selection is not None:
        plan = sharing_plan(selection)
        if warm_state is not None:
            _warm_start(model, warm_state, plan)
        shared_users = tie_shared_lora(model, plan, cfg.loradrop.train_shared)
        log.info("shared LoRA users per module: %s", shared_users)
    trainable = trainable_parameter_count(model)
    summary["trainable_params"] = trainable
    if info.is_main:
        log.info("trainable parameters: %s (plain LoRA: %s, %.1f%%)", format_count(trainable),
                 format_count(plain_lora_params), 100.0 * trainable / plain_lora_params)
    engine = create_engine(model, ds_config, cfg.train.lr, cfg.train.weight_decay,
                           lr_lambda(cfg.train.lr_schedule, cfg.train.warmup_steps, cfg.train.max_steps,
                                     cfg.train.min_lr_ratio))
    if "zero_shot" not in summary:
        summary["zero_shot"] = run_eval(engine, "zero-shot eval")
        logger.log({"stage": "zero_shot", **summary["zero_shot"]}, step=0)

    # ------------------------------------------------------------ 5. main stage
    stream = data_lib.BatchStream(range(len(train_set.examples)), cfg.train.micro_batch_size, info.rank,
                                  info.world_size, cfg.seed + 1)
    logger.log({"stage": "main", "trainable_params": trainable, "plain_lora_params": plain_lora_params}, step=0)

    def periodic_eval(step: int) -> None:
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.max_steps:
            logger.log({"stage": "eval", **run_eval(engine, f"eval@{step}")}, step=step)

    result = train_stage(engine, train_set.examples, stream, cfg.train.max_steps, stage="main", info=info,
                         pad_id=pad_id, logger=logger, log_every=cfg.train.log_every, on_step=periodic_eval)
    summary["main"] = {"steps": result.steps, "final_loss": result.losses[-1], "seconds": result.seconds,
                       "tokens_per_s_per_rank": result.tokens_per_rank / max(result.seconds, 1e-9)}
    probe: dict | None = {} if cfg.train.save_probe_logits else None
    summary["final"] = run_eval(engine, "final eval", probe=probe)
    logger.log({"stage": "eval", **summary["final"]}, step=cfg.train.max_steps)

    # ------------------------------------------------------------------ 6. save
    checkpoint.save_adapter(engine.module, out_dir / "adapter", info.is_main)
    if info.is_main and probe:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in probe.items()}, out_dir / "probe_logits.safetensors")
    summary["wall_seconds"] = time.perf_counter() - wall_start
    if info.is_main:
        if selection is not None:
            summary["kept_layers"] = selection.kept_layers
            summary["kept"] = selection.kept
        write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
        print_summary(summary)
    logger.close()
    release_engine(engine)
    return 0


def _warm_start(model: torch.nn.Module, warm_state: dict[str, torch.Tensor], plan: dict) -> None:
    """Copy the sampling-stage LoRA weights of kept (layer, module) pairs into the new
    model (before DeepSpeed partitions it, so plain copies suffice)."""
    from loradrop_ds.lora import lora_layers

    layers = lora_layers(model, sorted({m for _, m in plan}))
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    with torch.no_grad():
        for key, keep in plan.items():
            if not keep:
                continue
            for p in layers[key].parameters():
                if id(p) in names and names[id(p)] in warm_state:
                    p.copy_(warm_state[names[id(p)]])


def print_summary(summary: dict) -> None:
    def acc(d: dict) -> str:
        return f"{d['eval_accuracy']:.1%}" if "eval_accuracy" in d else "n/a"

    lines = ["", "=== LoRA-drop run summary ==="]
    if summary.get("zero_shot") or summary.get("final"):
        lines.append(f"accuracy: zero-shot {acc(summary.get('zero_shot', {}))} -> final {acc(summary.get('final', {}))}"
                     f"   eval loss {summary.get('zero_shot', {}).get('eval_loss', float('nan')):.4f} -> "
                     f"{summary.get('final', {}).get('eval_loss', float('nan')):.4f}")
    if "kept_layers" in summary:
        lines.append(f"kept layers ({len(summary['kept_layers'])} of {summary['num_layers']}): {summary['kept_layers']}")
    lines.append(f"trainable parameters: {format_count(summary['trainable_params'])} vs plain LoRA "
                 f"{format_count(summary['plain_lora_params'])} "
                 f"({100.0 * summary['trainable_params'] / summary['plain_lora_params']:.1f}%)")
    lines.append(f"wall time: {summary['wall_seconds']:.0f} s")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (config_lib.ConfigError, data_lib.DataError, ModelError) as e:
        # Bad input: one clear line, no traceback, exit 2. Everything else keeps its traceback.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
