"""The dtype in which a bf16 run's ZeRO-3 optimizer holds the LoRA gradients.

torchrun --nproc_per_node 2 tests/workers/grad_dtype.py MODEL_DIR OUT_JSON[,ds.key=json...] ...

One bf16 engine over the tiny model with LoRA (fp32 adapters on a bf16 base) runs one
forward and backward; rank 0 writes the dtypes the optimizer reduced into and accumulates
in, read from the gradient partitions it holds after the backward. Each OUT_JSON (with its own
DeepSpeed settings after commas) is a fresh model and engine, one after another in these
processes, each released with ``release_engine`` before the next.
"""

import json
import sys

from loradrop_ds import distributed
from loradrop_ds.deepspeed_private import release_engine
from loradrop_ds.engine import create_engine, lr_lambda
from loradrop_ds.lora import add_lora
from loradrop_ds.model import load_model, load_tokenizer
from workers.common import ds_config_for, rank_batches, tiny_config


def main() -> None:
    model_dir = sys.argv[1]
    info = distributed.init_distributed()
    for job in sys.argv[2:]:
        out, *settings = job.split(",")
        record_dtypes(info, model_dir, out, settings)
    distributed.exit_process(0)


def record_dtypes(info, model_dir: str, out: str, settings: list[str]) -> None:
    cfg = tiny_config(model_dir, "model.dtype=bfloat16")
    ds = ds_config_for(cfg, info.world_size)
    for item in settings:  # e.g. data_types={} to drop the project's default
        key, _, value = item.partition("=")
        ds[key] = json.loads(value)
    model, _hf_ds = load_model(cfg.model, ds, info.device.type)
    model = add_lora(model, cfg.lora, seed=0)
    engine = create_engine(model, ds, 1e-3, 0.0, lr_lambda("constant", 0, 1, 1.0))
    batch = rank_batches(cfg, load_tokenizer(model_dir), per_rank=2, world=info.world_size)[info.rank]
    engine.backward(engine(**batch).loss)
    opt = engine.optimizer
    grads = [g for g in opt.averaged_gradients.values() for g in g] if isinstance(opt.averaged_gradients, dict) else []
    if info.is_main:
        with open(out, "w") as f:
            json.dump({"gradient_accumulation_dtype": str(opt.gradient_accumulation_dtype),
                       "partition_dtypes": sorted({str(g.dtype) for g in grads}),
                       "lora_param_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})}, f)
    del model, opt, grads
    release_engine(engine)


if __name__ == "__main__":
    main()
