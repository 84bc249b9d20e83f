"""Parameter gathers per ZeRO-3 training step, with or without an evaluation first.

torchrun --nproc_per_node 2 tests/workers/eval_trace.py MODEL_DIR OUT_FILE eval|no-eval
Rank 0 writes {"fetched": [parameters gathered in each training step]} as JSON."""

import json
import sys

from loradrop_ds import data as data_lib
from loradrop_ds import distributed
from loradrop_ds.deepspeed_private import release_engine
from loradrop_ds.engine import create_engine, lr_lambda
from loradrop_ds.lora import add_lora
from loradrop_ds.model import load_model, load_tokenizer
from loradrop_ds.training import evaluate
from workers.common import ds_config_for, rank_batches, tiny_config

STEPS = 6


def main(model_dir: str, jobs: list[str]) -> None:
    info = distributed.init_distributed()
    for out_file, mode in zip(jobs[::2], jobs[1::2], strict=True):
        count_gathers(info, model_dir, out_file, mode)
    distributed.exit_process(0)


def count_gathers(info, model_dir: str, out_file: str, mode: str) -> None:
    cfg = tiny_config(model_dir, "train.micro_batch_size=2")
    ds_config = ds_config_for(cfg, info.world_size)  # zero3_tiny.json: every weight partitioned
    model, _hf = load_model(cfg.model, ds_config, "cpu")
    model = add_lora(model, cfg.lora, cfg.seed)
    engine = create_engine(model, ds_config, lr=1e-3, weight_decay=0.0, lr_factor=lr_lambda("constant", 0, 1, 1.0))
    fetched = [0]

    def counting(original):
        def all_gather_coalesced(params, *args, **kwargs):
            fetched[0] += len(params)
            return original(params, *args, **kwargs)
        return all_gather_coalesced

    for p in engine.module.parameters():  # the coordinator gathers through the group's first parameter
        if hasattr(p, "all_gather_coalesced"):
            p.all_gather_coalesced = counting(p.all_gather_coalesced)
    tokenizer = load_tokenizer(model_dir)
    if mode == "eval":
        records = data_lib.load_records(cfg.data.train_file, "data.train_file")[:8]
        evaluate(engine, data_lib.tokenize_records(records, tokenizer, cfg.data, "eval"), info, 2,
                 tokenizer.pad_token_id)
    batch = rank_batches(cfg, tokenizer, per_rank=2, world=info.world_size)[info.rank]
    per_step = []
    for _ in range(STEPS):
        before = fetched[0]
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        per_step.append(fetched[0] - before)
    if info.is_main:
        with open(out_file, "w") as f:
            json.dump({"fetched": per_step}, f)
    release_engine(engine)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
