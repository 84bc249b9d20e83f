"""One 2-rank ZeRO-3 step of LoRAPrune's scoring on the tiny GQA model (LoRA on all seven
projections; layers 1 and 3 keep their LoRA, layers 0 and 2 share one), then one update.

torchrun --nproc_per_node 2 tests/workers/prune_step.py MODEL_DIR OUT_DIR plain|checkpointing [OUT_DIR MODE ...]
For each (OUT_DIR, MODE), one after another in these processes (each engine released with
``release_engine`` before the next, as train.py's runs in one process: tests/workers/train_many.py),
rank 0 writes the LoRA weights before the step (a shared LoRA once, under layer 0's names);
every rank writes its PruneState after the update (state_rank{R}.safetensors)."""

import sys

import torch
from safetensors.torch import save_file

from loradrop_ds import distributed
from loradrop_ds.deepspeed_private import release_engine
from loradrop_ds.engine import create_engine, lr_lambda
from loradrop_ds.importance import sharing_plan
from loradrop_ds.lora import add_lora, tie_shared_lora
from loradrop_ds.model import load_model, load_tokenizer
from loradrop_ds.model_dims import read_model_dims
from loradrop_ds.prune_zero3 import Pruner
from workers.common import TIED_KEPT_LAYERS as KEPT
from workers.common import ds_config_for, hand_selection, randomize_lora_b, rank_batches, tiny_config

ALL_MODULES = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
# Step 1 of 2 is an update step, and the cubic schedule is at its target (0.5) there: one of
# the two KV groups and 64 of the 128 channels go in every layer (none exempt).
PRUNE = ["train.micro_batch_size=2", ALL_MODULES, "prune.target_sparsity=0.5", "prune.every=1",
         "prune.start_fraction=0", "prune.end_fraction=0.5", "prune.exempt_first_fraction=0",
         "prune.exempt_last=false"]
TOTAL_STEPS = 2


def main(model_dir: str, jobs: list[str]) -> None:
    info = distributed.init_distributed()
    for out_dir, mode in zip(jobs[::2], jobs[1::2], strict=True):
        assert mode in ("plain", "checkpointing"), mode
        prune_step(info, model_dir, out_dir, mode)
    distributed.exit_process(0)


def prune_step(info, model_dir: str, out_dir: str, mode: str) -> None:
    cfg = tiny_config(model_dir, *PRUNE, *(["model.gradient_checkpointing=true"] if mode == "checkpointing" else []))
    ds_config = ds_config_for(cfg, info.world_size)  # zero3_tiny.json: every weight partitioned
    dims = read_model_dims(cfg.model, cfg.lora.target_modules)  # on the meta device, before ZeRO-3's Init is on
    model, _hf = load_model(cfg.model, ds_config, "cpu")
    model = add_lora(model, cfg.lora, cfg.seed)
    randomize_lora_b(model, seed=7, scale=0.5)
    tie_shared_lora(model, sharing_plan(hand_selection(4, cfg.lora.target_modules, KEPT)), train_shared=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    pruner = Pruner(model, cfg.prune, list(cfg.lora.target_modules), dims, TOTAL_STEPS, info.device)
    engine = create_engine(model, ds_config, lr=1e-3, weight_decay=0.0, lr_factor=lr_lambda("constant", 0, 1, 1.0))
    batch = rank_batches(cfg, load_tokenizer(model_dir), per_rank=2, world=info.world_size)[info.rank]
    engine.train()  # from_pretrained leaves eval mode, where transformers skips activation checkpointing
    pruner.begin_step(1)
    with pruner.recording(torch.ones_like(batch["input_ids"])):
        out = engine(**batch)
    engine.backward(out.loss)
    engine.step()
    pruner.update(1, info.world_size)
    if info.is_main:
        save_file(before, f"{out_dir}/before.safetensors")
    save_file(pruner.state.to_tensors(), f"{out_dir}/state_rank{info.rank}.safetensors")
    del model, out
    release_engine(engine)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
