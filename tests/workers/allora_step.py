"""2-rank ZeRO-3 step of ALLoRA LoRA (kept layers 1 and 3, layers 0 and 2 sharing one).

torchrun --nproc_per_node 2 tests/workers/allora_step.py MODEL_DIR OUT_DIR
Rank 0 writes the LoRA weights before the step, the full gradients and each rank's batch."""

import sys

from deepspeed.utils import safe_get_full_grad
from safetensors.torch import save_file

from loradrop_ds import distributed
from loradrop_ds.engine import create_engine, lr_lambda
from loradrop_ds.importance import sharing_plan
from loradrop_ds.lora import add_lora, tie_shared_lora
from loradrop_ds.model import load_model, load_tokenizer
from workers.common import TIED_KEPT_LAYERS as KEPT
from workers.common import ds_config_for, hand_selection, randomize_lora_b, rank_batches, tiny_config

ALLORA = ["lora.variant=allora", "lora.alpha=8", "lora.allora_eta2=4.0", "train.micro_batch_size=2"]


def main(model_dir: str, out_dir: str) -> None:
    info = distributed.init_distributed()
    cfg = tiny_config(model_dir, *ALLORA)
    ds_config = ds_config_for(cfg, info.world_size)  # zero3_tiny.json: every LoRA weight partitioned
    model, _hf = load_model(cfg.model, ds_config, "cpu")
    model = add_lora(model, cfg.lora, cfg.seed)
    randomize_lora_b(model, seed=7, scale=0.5)
    tie_shared_lora(model, sharing_plan(hand_selection(4, cfg.lora.target_modules, KEPT)), train_shared=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = create_engine(model, ds_config, lr=1e-3, weight_decay=0.0, lr_factor=lr_lambda("constant", 0, 1, 1.0))
    batches = rank_batches(cfg, load_tokenizer(model_dir), per_rank=2, world=info.world_size)
    out = engine(**batches[info.rank])
    engine.backward(out.loss)
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    if info.is_main:
        save_file(before, f"{out_dir}/before.safetensors")
        save_file(grads, f"{out_dir}/grads.safetensors")
    distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
