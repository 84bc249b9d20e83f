#!/usr/bin/env python
"""The statistics hooks' cost: the same sampling-stage steps with and without the
ImportanceRecorder, alternating, in one process (launched by bench/speed.py).

    torchrun --nproc_per_node 2 bench/speed_hooks_worker.py --out FILE [--warmup 6]
        [--pairs 4] [--block 4] [dotted.key=value ...]

Builds the sampling stage as launch/train.py does (load_model inside ZeRO-3, add_lora in
every layer, create_engine with the sampling LR and a constant schedule, the sampling
subset's micro-batches, TrainingStage), then runs ``--warmup`` steps (not counted) and
``--pairs`` pairs of blocks of ``--block`` steps: one block with a fresh
``ImportanceRecorder(model, target_modules, device)`` (removed after the block), one
without any hook. Both blocks of a pair start at the same data position, so they train
on the same micro-batches; the order inside a pair alternates (with, without / without,
with) so a drift of the machine hits both alike. The LoRA weights keep training across
blocks (so the second block of a pair sees slightly different weights: irrelevant for
the time). Per step: wall time from the end of the previous step (TrainingStage's
loop body; each step ends with the loss all-reduce, a sync point). Also measures this
rank's AdamW state bytes (from the optimizer's tensors) against the formula.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_common as common  # noqa: E402  (puts the checkout on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from loradrop_ds import data as data_lib
    from loradrop_ds.deepspeed_private import release_engine
    from loradrop_ds.distributed import init_distributed, shutdown
    from loradrop_ds.engine import create_engine, lr_lambda
    from loradrop_ds.lora import ImportanceRecorder, add_lora, trainable_parameter_count
    from loradrop_ds.metrics import MetricsLogger
    from loradrop_ds.model import load_model
    from loradrop_ds.training import TrainingStage

    cfg = common.load_cfg(args.overrides)
    info = init_distributed(cfg.dist.timeout_minutes)
    inputs = common.prepare_inputs(cfg, info.rank, info.local_rank, info.world_size)
    train_set, tokenizer = inputs["train_set"], inputs["tokenizer"]
    sample = data_lib.draw_sample(len(train_set), cfg.loradrop.sample_ratio, cfg.seed, train_set.class_labels)

    model, hf_ds = load_model(cfg.model, inputs["ds_config"], info.device.type)
    model = add_lora(model, cfg.lora, cfg.seed)
    total_steps = args.warmup + 2 * args.pairs * args.block
    engine = create_engine(model, inputs["ds_config"], cfg.loradrop.sampling_lr or cfg.train.lr,
                           cfg.train.weight_decay, lr_lambda("constant", 0, total_steps, 1.0))
    batches = data_lib.MicroBatches(train_set, sample, cfg.data, cfg.train.micro_batch_size, info.rank,
                                    info.world_size, cfg.seed, tokenizer.pad_token_id)
    scratch = tempfile.mkdtemp(prefix="hooks-metrics-")
    logger = MetricsLogger(scratch, enabled=info.is_main)  # TrainingStage logs each step, as in the CLI

    def block(steps: int, with_hooks: bool) -> list[float]:
        recorder = ImportanceRecorder(model, cfg.lora.target_modules, info.device) if with_hooks else None
        marks = [time.perf_counter()]
        for _step, _loss in TrainingStage(engine, batches, steps, stage="sampling", info=info, logger=logger,
                                          log_every=cfg.train.log_every, recorder=recorder):
            marks.append(time.perf_counter())
        if recorder is not None:
            recorder.remove()
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    warmup = block(args.warmup, with_hooks=True) if args.warmup else []
    with_hooks: list[float] = []
    without: list[float] = []
    blocks = []
    for pair in range(args.pairs):
        position = batches.stream.position
        order = (True, False) if pair % 2 == 0 else (False, True)
        for hooks in order:
            batches.stream.position = position  # the same micro-batches for both blocks of the pair
            times = block(args.block, hooks)
            (with_hooks if hooks else without).extend(times)
            blocks.append({"pair": pair, "hooks": hooks, "step_s": times})

    opt_bytes = common.optimizer_state_bytes(engine.optimizer.optimizer)
    partition = common.zero3_partition_numel(engine.module, info.world_size)
    trainable = trainable_parameter_count(engine.module)
    peak = common.peak_rss_gib()
    logger.close()
    release_engine(engine)
    model = None
    del hf_ds  # transformers' ZeRO-3 config: alive as long as the model was used
    if info.is_main:
        med_with, med_without = statistics.median(with_hooks), statistics.median(without)
        common.write_json(args.out, {
            "world_size": info.world_size, "overrides": args.overrides, "warmup_steps": args.warmup,
            "pairs": args.pairs, "block": args.block, "warmup_step_s": warmup, "blocks": blocks,
            "median_step_s_with_hooks": med_with, "median_step_s_without_hooks": med_without,
            "min_max_with_hooks": [min(with_hooks), max(with_hooks)],
            "min_max_without_hooks": [min(without), max(without)],
            "hooks_cost_fraction": med_with / med_without - 1.0,
            # The same micro-batch with and without hooks, step by step: the step-time spread
            # from sequence lengths cancels; the median difference over the median step.
            "paired_cost_fraction": statistics.median(
                w - o for p in range(args.pairs)
                for w, o in zip(next(b["step_s"] for b in blocks if b["pair"] == p and b["hooks"]),
                                next(b["step_s"] for b in blocks if b["pair"] == p and not b["hooks"]), strict=True)
            ) / med_without,
            "total_time_cost_fraction": sum(with_hooks) / sum(without) - 1.0,
            # per-pair medians: the spread of the cost estimate
            "pair_cost_fractions": [
                statistics.median(next(b["step_s"] for b in blocks if b["pair"] == p and b["hooks"]))
                / statistics.median(next(b["step_s"] for b in blocks if b["pair"] == p and not b["hooks"])) - 1.0
                for p in range(args.pairs)],
            "trainable_params": trainable, "partition_numel_rank0": partition,
            "optimizer_state_bytes_rank0_measured": opt_bytes,
            "optimizer_state_bytes_rank0_formula": 8 * partition,
            "peak_rss_gib_rank0": peak,
        })
    shutdown()


if __name__ == "__main__":
    main()
