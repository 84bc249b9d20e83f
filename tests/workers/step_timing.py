"""TrainingStage's step timing leaves out what the recipe does between steps, on a real
ZeRO-3 engine, and where a one-rank engine keeps its base.

torchrun --nproc_per_node 1 tests/workers/step_timing.py MODEL_DIR OUT_DIR
The clock TrainingStage reads jumps by 1000 s in the loop body after every step (as a long
checkpoint or evaluation would take); metrics.jsonl is written to OUT_DIR. The stage counts
model FLOPs with the hand-set ``FLOPS`` and MFU against ``PEAK``; OUT_DIR/rows.json gets the
batch's real tokens per row and the stage result's rates. The config is
ds_configs/zero3.json with its "auto" values for one rank; after the steps residency.json
says, per base parameter, whether ZeRO-3 keeps it resident and whether its full tensor is
its partition's storage (no second copy)."""

import json
import sys
import time
import types
from pathlib import Path

import torch

from loradrop_ds import distributed, training
from loradrop_ds.engine import create_engine, lr_lambda
from loradrop_ds.lora import add_lora
from loradrop_ds.metrics import MetricsLogger
from loradrop_ds.model import load_model, load_tokenizer
from loradrop_ds.throughput import StepFlops
from workers.common import ds_config_for, rank_batches, tiny_config

JUMP = 1000.0
FLOPS = StepFlops(linear_weights=1000, num_layers=2, attention_width=8, recompute=False)
PEAK = 1e6  # FLOP/s


def main(model_dir: str, out_dir: str) -> None:
    info = distributed.init_distributed()
    cfg = tiny_config(model_dir, "train.micro_batch_size=2", "deepspeed=ds_configs/zero3.json")
    ds_config = ds_config_for(cfg, info.world_size)
    model, _hf = load_model(cfg.model, ds_config, "cpu")
    model = add_lora(model, cfg.lora, cfg.seed)
    engine = create_engine(model, ds_config, lr=1e-3, weight_decay=0.0, lr_factor=lr_lambda("constant", 0, 1, 1.0))
    batch = rank_batches(cfg, load_tokenizer(model_dir), per_rank=2, world=info.world_size)[info.rank]
    batch["token_mask"] = batch["attention_mask"].bool()

    def batches():
        while True:
            yield dict(batch)

    offset = [0.0]
    training.time = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0])

    logger = MetricsLogger(out_dir, enabled=info.is_main)
    stage = training.TrainingStage(engine, batches(), 4, stage="main", info=info, logger=logger, log_every=1,
                                   flops=FLOPS, peak_flops=PEAK)
    for _step, _loss in stage:
        offset[0] += JUMP
    logger.close()
    result = stage.result()
    assert result.steps == 4
    (Path(out_dir) / "rows.json").write_text(json.dumps({"row_tokens": batch["token_mask"].sum(dim=1).tolist(),
                                                        "rates": result.rates(PEAK)}))
    if info.is_main:
        write_residency(engine, ds_config, f"{out_dir}/residency.json")
    distributed.exit_process(0)


def write_residency(engine, ds_config: dict, path: str) -> None:
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    base = [(n, p) for n, p in engine.module.named_parameters() if not p.requires_grad]
    residency = {n: {"persistent": bool(p.ds_persist), "available": p.ds_status == ZeroParamStatus.AVAILABLE,
                     "numel": int(p.numel()),
                     "is_its_partition": p.data.untyped_storage().data_ptr() == p.ds_tensor.untyped_storage().data_ptr()}
                 for n, p in base}
    with open(path, "w") as f:
        json.dump({"zero": {k: ds_config["zero_optimization"][k] for k in
                            ("stage3_param_persistence_threshold", "memory_efficient_linear")},
                   "deepspeed_linear": torch.nn.functional.linear is zero3_linear_wrap,
                   "base": residency}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
