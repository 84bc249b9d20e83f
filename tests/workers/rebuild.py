"""The rebuild between the stages on 2 ranks.

torchrun --nproc_per_node 2 tests/workers/rebuild.py MODEL_DIR OUT_DIR MODE

A sampling-stage engine (LoRA everywhere) trains 2 steps; then the main stage's tied
LoRA is built and trains 3 steps. MODE:

* ``inplace``: what launch/train.py does: ``release_engine(keep_model=True)``, ``strip_lora``
  and a new engine on the same ZeRO-3-partitioned base. The base's weight files are moved
  away once the sampling model is loaded, so any second read of them fails.
* ``reload``: the reference: the sampling engine and model are freed and the base is
  loaded again from disk.
* ``plain-destroy``: like ``reload`` but with DeepSpeed's own ``engine.destroy()`` only (the
  0.19.8 leak), as a control that shows the "freed" check can see a leak.

Rank 0 writes rebuild.json (losses, what was freed, hook counts) and adapter.safetensors.
"""

import gc
import json
import sys
import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file

from loradrop_ds import adapter_io, distributed
from loradrop_ds.deepspeed_private import release_engine
from loradrop_ds.engine import create_engine, lr_lambda
from loradrop_ds.importance import sharing_plan
from loradrop_ds.lora import add_lora, build_main_lora, strip_lora
from loradrop_ds.model import load_model, load_tokenizer
from workers.common import ds_config_for, hand_selection, rank_batches, tiny_config

KEPT = [1, 3]


def train(engine, batch, steps):
    losses = []
    for _ in range(steps):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def zero_params_alive():
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.nn.Parameter) and hasattr(o, "ds_id"))


def main(model_dir: str, out_dir: str, mode: str) -> None:
    from deepspeed.runtime.zero import parameter_offload

    info = distributed.init_distributed()
    cfg = tiny_config(model_dir, "train.micro_batch_size=2", "lora.dropout=0.1")
    ds_config = ds_config_for(cfg, info.world_size)
    batch = rank_batches(cfg, load_tokenizer(model_dir), 2, info.world_size)[info.rank]

    model, hf = load_model(cfg.model, ds_config, "cpu")
    base_ids = {n: id(p) for n, p in model.named_parameters()}
    if mode == "inplace" and info.is_main:
        for f in Path(model_dir).glob("*.safetensors"):  # from now on the base cannot be read again
            f.rename(f.with_suffix(".moved"))
    model = add_lora(model, cfg.lora, cfg.seed)
    engine = create_engine(model, ds_config, 1e-2, 0.0, lr_lambda("constant", 0, 2, 1.0))
    sampling_losses = train(engine, batch, 2)
    old_lora = weakref.ref(next(p for n, p in model.named_parameters() if "lora_A" in n))
    old_optimizer = weakref.ref(engine.optimizer)
    old_model, old_param = weakref.ref(model), weakref.ref(next(model.base_model.model.parameters()))
    del model

    if mode == "inplace":
        base = strip_lora(release_engine(engine, keep_model=True))
    else:
        if mode == "plain-destroy":
            engine.destroy()
        else:
            release_engine(engine)
        del hf
        gc.collect()
    del engine
    gc.collect()
    freed = {"lora": old_lora() is None, "optimizer": old_optimizer() is None,
             "model": old_model() is None and old_param() is None}
    stack_len = len(parameter_offload.FWD_MODULE_STACK)
    if mode != "inplace":
        base, hf = load_model(cfg.model, ds_config, "cpu")
    same_base = {n: id(p) for n, p in base.named_parameters()} == base_ids

    plan = sharing_plan(hand_selection(4, cfg.lora.target_modules, KEPT))
    model, _ = build_main_lora(base, cfg.lora, cfg.seed + 1, plan, train_shared=True)
    del base
    engine = create_engine(model, ds_config, 1e-2, 0.0, lr_lambda("constant", 0, 3, 1.0))
    del model
    main_losses = train(engine, batch, 3)
    gc.collect()
    trainable = {id(p) for p in engine.module.parameters()}
    leftover = zero_params_alive() - len(trainable)  # ZeRO-3 parameters not in the main model
    adapter = adapter_io.gather_lora_state(engine.module, copy_here=info.is_main)
    if info.is_main:
        save_file(adapter, f"{out_dir}/adapter.safetensors")
        with open(f"{out_dir}/rebuild.json", "w") as f:
            json.dump({"sampling_losses": sampling_losses, "main_losses": main_losses, "freed": freed,
                       "same_base_objects": same_base, "fwd_module_stack": stack_len,
                       "zero_params_not_in_main_model": leftover, "hooks": hook_count(engine.module)}, f)
    distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
