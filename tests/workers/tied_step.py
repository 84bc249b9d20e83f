"""2-rank ZeRO-3 training step of a model with a tied shared LoRA.

torchrun --nproc_per_node 2 tests/workers/tied_step.py MODEL_DIR OUT_DIR
Rank 0 writes the loss, full gradients (before the step) and parameters (after it)."""

import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from safetensors.torch import save_file

from loradrop_ds import adapter_io, distributed
from loradrop_ds.engine import create_engine, lr_lambda
from loradrop_ds.importance import sharing_plan
from loradrop_ds.lora import add_lora, tie_shared_lora, trainable_parameter_count
from loradrop_ds.model import load_model, load_tokenizer
from workers.common import TIED_KEPT_LAYERS as KEPT
from workers.common import ds_config_for, hand_selection, randomize_lora_b, rank_batches, tiny_config


def main(model_dir: str, out_dir: str) -> None:
    info = distributed.init_distributed()
    cfg = tiny_config(model_dir, "train.micro_batch_size=2")
    ds_config = ds_config_for(cfg, info.world_size)
    model, _hf = load_model(cfg.model, ds_config, "cpu")
    model = add_lora(model, cfg.lora, cfg.seed)
    randomize_lora_b(model, seed=7)
    plan = sharing_plan(hand_selection(4, cfg.lora.target_modules, KEPT))
    tie_shared_lora(model, plan, train_shared=True)
    engine = create_engine(model, ds_config, lr=1e-3, weight_decay=0.0, lr_factor=lr_lambda("constant", 0, 1, 1.0))
    # Each partitioned trainable parameter is owned once by the optimizer.
    flat = sum(int(g.numel()) for g in engine.optimizer.fp32_partitioned_groups_flat)
    flat_total = torch.tensor([flat], dtype=torch.int64)
    dist.all_reduce(flat_total)

    batch = rank_batches(cfg, load_tokenizer(model_dir), per_rank=2, world=info.world_size)[info.rank]
    out = engine(**batch)
    engine.backward(out.loss)
    names = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in names}  # collective: every rank
    engine.step()
    params = adapter_io.gather_lora_state(engine.module)
    losses = [None] * info.world_size
    dist.all_gather_object(losses, float(out.loss))
    if info.is_main:
        save_file(grads, f"{out_dir}/grads.safetensors")
        save_file(params, f"{out_dir}/params.safetensors")
        torch.save({"losses": losses, "optimizer_numel": int(flat_total), "trainable": trainable_parameter_count(engine.module)},
                   f"{out_dir}/meta.pt")
    distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
