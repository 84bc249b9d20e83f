"""Engine rebuild on 2 ranks: after ``release_engine`` the first model is freed.

torchrun --nproc_per_node 2 tests/workers/rebuild.py MODEL_DIR OUT_DIR [--plain-destroy]
With --plain-destroy only ``engine.destroy()`` is called (the DeepSpeed 0.19.8 leak),
as a control that shows the check can see a leak."""

import gc
import json
import sys
import weakref

from loradrop_ds import distributed
from loradrop_ds.engine import create_engine, load_ds_config, lr_lambda, release_engine
from loradrop_ds.lora import add_lora
from loradrop_ds.model import load_model, load_tokenizer
from workers.common import rank_batches, tiny_config


def build_and_step(cfg, ds_config, batch):
    model, hf = load_model(cfg.model, ds_config, "cpu")
    model = add_lora(model, cfg.lora, cfg.seed)
    engine = create_engine(model, ds_config, 1e-3, 0.0, lr_lambda("constant", 0, 1, 1.0))
    out = engine(**batch)
    engine.backward(out.loss)
    engine.step()
    return engine, model, hf, float(out.loss)


def main(model_dir: str, out_dir: str, plain_destroy: bool) -> None:
    from deepspeed.runtime.zero import parameter_offload

    info = distributed.init_distributed()
    cfg = tiny_config(model_dir, "train.micro_batch_size=2")
    ds_config = load_ds_config(cfg, info.world_size)
    batch = rank_batches(cfg, load_tokenizer(model_dir), 2, info.world_size)[info.rank]

    engine, model, hf, _ = build_and_step(cfg, ds_config, batch)
    first_model = weakref.ref(model)
    first_base = weakref.ref(model.base_model.model)
    first_param = weakref.ref(next(model.base_model.model.parameters()))
    if plain_destroy:
        engine.destroy()
    else:
        release_engine(engine)
    del engine, model, hf
    gc.collect()
    freed = first_model() is None and first_base() is None and first_param() is None
    stack_len = len(parameter_offload.FWD_MODULE_STACK)

    engine, model, hf, loss = build_and_step(cfg, ds_config, batch)  # the second engine trains
    if info.is_main:
        with open(f"{out_dir}/rebuild.json", "w") as f:
            json.dump({"freed": freed, "fwd_module_stack": stack_len, "second_loss": loss}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--plain-destroy" in sys.argv[3:])
