#!/usr/bin/env python
"""Plain LoRA through the path most users run: transformers.Trainer + peft + DeepSpeed
ZeRO-3, on the CLI's model, examples, batches, ZeRO-3 config and schedule.

    torchrun --nproc_per_node 2 bench/hf_trainer_lora.py --out FILE [--steps 50]
        [--ds-config resolved|json] [dotted.key=value ...]

What is the same as ``launch/train.py loradrop.enabled=false`` (the ``plain`` row of
bench/speed.py):

* model: the recipe's ``model.path`` (builtin SmolLM2-135M-Instruct, converted once by
  ``prepare_builtin_model``), loaded with ``loradrop_ds.model.load_model`` after the
  TrainingArguments exist, so transformers builds it inside ``deepspeed.zero.Init``
  (ZeRO-3 partitioned while loading, as the CLI does); LoRA injected with the library's
  ``add_lora`` (peft, r/alpha/dropout/targets of the recipe, seed ``seed + 1`` as the
  CLI's main stage);
* data: the tokenised cache entry of ``data.train_file`` (``loradrop_ds.data``), and the
  very micro-batches of the CLI's main stage: ``MicroBatches(range(len(train)), seed + 1)``
  on this rank, collated by ``loradrop_ds.data.collate`` (the Trainer's
  ``get_train_dataloader`` is overridden to return them in order; accelerate neither
  shards nor reshuffles them). ``token_mask`` is dropped, as the CLI does before forward;
* ZeRO-3 config: ``--ds-config resolved`` (default) passes the dict the CLI builds
  (``loradrop_ds.engine.load_ds_config``: ds_configs/zero3.json with its "auto" values
  filled from the recipe and model); ``--ds-config json`` passes ds_configs/zero3.json
  itself and lets the Trainer fill its "auto" values (its rules: prefetch bucket
  0.9 hidden^2, persistence 10 hidden, communication dtype not set);
* optimisation: torch AdamW (``optim=adamw_torch``, betas 0.9/0.999, eps 1e-8, the
  recipe's weight decay) as DeepSpeed's client optimizer, lr ``train.lr``, the CLI's own
  schedule (``loradrop_ds.engine.lr_lambda``: linear warmup of ``train.warmup_steps`` from
  lr / warmup_steps, then ``train.lr_schedule`` over ``--steps``; the Trainer's
  ``create_scheduler`` is overridden, since transformers' warmup starts at lr 0), clipping
  ``train.max_grad_norm``, micro-batch ``train.micro_batch_size``, ``train.grad_accum``,
  fp32 (bf16 when model.dtype=bfloat16, as on the GPU), loss logged every step (an all-reduce per step, like the CLI's);
* process group: ``loradrop_ds.distributed.init_distributed`` (gloo on CPU), before the
  Trainer's accelerate state joins it. It skips DeepSpeed's CPU shared-memory op build,
  about 40 s of g++ at start-up that a stock Trainer run on CPU pays (not in step time).

What differs: the Trainer's own loop (its loss scaling by ``num_items_in_batch`` when the
model accepts it, its logging and callbacks). Per step: wall time between consecutive
``on_step_end`` callbacks (``time.perf_counter``; the first from ``on_train_begin``),
tokens per rank from the micro-batches' attention masks (the same count as the CLI's
``token_mask``). Peak RSS per rank.
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
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--ds-config", choices=["resolved", "json"], default="resolved")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    wall_start = time.perf_counter()

    import json

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from loradrop_ds import data as data_lib
    from loradrop_ds.distributed import init_distributed
    from loradrop_ds.engine import lr_lambda
    from loradrop_ds.lora import add_lora, trainable_parameter_count
    from loradrop_ds.model import load_model

    cfg = common.load_cfg(args.overrides)
    info = init_distributed(cfg.dist.timeout_minutes)
    inputs = common.prepare_inputs(cfg, info.rank, info.local_rank, info.world_size)
    train_set, tokenizer = inputs["train_set"], inputs["tokenizer"]
    ds_config = inputs["ds_config"] if args.ds_config == "resolved" else json.loads(Path(cfg.deepspeed).read_text())
    t = cfg.train

    out_dir = tempfile.mkdtemp(prefix="hf-trainer-")
    training_args = TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, weight_decay=t.weight_decay,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=t.max_grad_norm,
        lr_scheduler_type="cosine", warmup_steps=t.warmup_steps, optim="adamw_torch",  # schedule: see below
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", seed=cfg.seed,
        deepspeed=ds_config, use_cpu=info.device.type == "cpu", bf16=cfg.model.dtype == "bfloat16", fp16=False,
        disable_tqdm=not info.is_main, dataloader_num_workers=0, remove_unused_columns=False,
    )
    # After TrainingArguments: transformers now sees ZeRO-3 and loads inside zero.Init.
    model, _ = load_model(cfg.model, None, info.device.type)
    model = add_lora(model, cfg.lora, cfg.seed + 1)

    # The CLI main stage's micro-batches on this rank, in order.
    stream = data_lib.MicroBatches(train_set, range(len(train_set)), cfg.data, t.micro_batch_size, info.rank,
                                   info.world_size, cfg.seed + 1, tokenizer.pad_token_id)
    micro = []
    for _ in range(args.steps * t.grad_accum):
        batch = next(stream)
        micro.append({k: v for k, v in batch.items() if k != "token_mask"})
    tokens_per_step = [sum(int(b["attention_mask"].sum()) for b in micro[i * t.grad_accum:(i + 1) * t.grad_accum])
                       for i in range(args.steps)]

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(micro)

        def __getitem__(self, i):
            return micro[i]

    class FixedBatchesTrainer(Trainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(Batches(), batch_size=None, shuffle=False)

        def create_scheduler(self, num_training_steps, optimizer=None):
            # The CLI's schedule (loradrop_ds.engine.lr_lambda): transformers' cosine-with-
            # warmup starts at lr 0 on the first step, the CLI's at lr / warmup_steps.
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lr_lambda(t.lr_schedule, t.warmup_steps, args.steps, t.min_lr_ratio))
            return self.lr_scheduler

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args_, state, control, **kw):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args_, state, control, **kw):
            self.marks.append(time.perf_counter())

    timer = StepTimes()
    trainer = FixedBatchesTrainer(model=model, args=training_args, train_dataset=Batches(), callbacks=[timer])
    trainer.train()
    step_s = [b - a for a, b in zip(timer.marks, timer.marks[1:], strict=False)]
    half = step_s[len(step_s) // 2:]
    tail_tokens = tokens_per_step[len(step_s) // 2:len(step_s)]
    engine = trainer.model_wrapped
    opt = getattr(getattr(engine, "optimizer", None), "optimizer", None)
    result = {
        "config": "hf_trainer", "world_size": info.world_size, "steps": args.steps, "ds_config": args.ds_config,
        "ds_config_used": {k: v for k, v in trainer.accelerator.state.deepspeed_plugin.deepspeed_config.items()}
        if trainer.accelerator.state.deepspeed_plugin else None,
        "distributed_type": str(trainer.accelerator.state.distributed_type),
        "engine_type": type(engine).__name__,
        "step_s": step_s, "median_step_s": statistics.median(half),
        "tokens_per_s_per_rank": sum(tail_tokens) / max(sum(half), 1e-9),
        "trainable_params": trainable_parameter_count(trainer.model),
        "partition_numel_rank0": common.zero3_partition_numel(trainer.model, info.world_size),
        "optimizer_state_bytes_rank0_measured": common.optimizer_state_bytes(opt) if opt is not None else None,
        "peak_memory_gib": common.peak_rss_gib() if info.device.type == "cpu"
        else torch.cuda.max_memory_allocated(info.device) / 2**30,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "wall_seconds_this_process": time.perf_counter() - wall_start,
    }
    if info.is_main:
        common.write_json(args.out, result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("step_s", "losses", "ds_config_used")}),
              flush=True)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
