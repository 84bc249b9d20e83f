"""2-rank ZeRO-3 training steps of a model with a tied shared LoRA, one engine per mode.

torchrun --nproc_per_node 2 tests/workers/tied_step.py MODEL_DIR OUT_DIR [MODE ...]

Each MODE loads the model afresh, builds the tied LoRA and an engine, trains one step and
releases the engine, in the order given, in these rank processes. Rank 0 writes, into
OUT_DIR/MODE/, the losses, full gradients (before the step) and parameters (after it).
Every mode reduces gradients in a bucket of 1 element: each is reduced as soon as the next
one arrives, so a reduction that comes between two uses of the shared LoRA shows (the
"auto" bucket of a real model, hidden^2, is reduced several times in one backward). MODE
(default: ``default``):

* ``default``: the ds_config as ``load_ds_config`` resolves it (``zero3_tiny.json``:
  ``memory_efficient_linear`` "auto", so on 2 ranks without recomputation DeepSpeed's
  linear).
* ``mel-off``: ``memory_efficient_linear: false``: torch's own ``F.linear``. DeepSpeed
  replaces ``torch.nn.functional.linear`` for the rest of the process once a ``zero.Init``
  runs with the setting on (partition_parameters.py ``_enable_mem_efficient_linear``, 0.19.8:
  "This will persist unless manually reset"), so this mode must come before the others.
* ``leaf``: every decoder layer a ZeRO-3 leaf module (``zero_optimization.leaf_module``),
  set in the resolved config and so past ``load_ds_config``'s refusal of it with a tied
  shared LoRA: shows what that refusal prevents.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from safetensors.torch import save_file

from loradrop_ds import adapter_io, distributed
from loradrop_ds.deepspeed_private import release_engine
from loradrop_ds.engine import create_engine, lr_lambda
from loradrop_ds.importance import sharing_plan
from loradrop_ds.lora import add_lora, tie_shared_lora, trainable_parameter_count
from loradrop_ds.model import load_model, load_tokenizer
from workers.common import TIED_KEPT_LAYERS as KEPT
from workers.common import ds_config_for, hand_selection, randomize_lora_b, rank_batches, tiny_config

MODES = ("default", "mel-off", "leaf")


def ds_config_of(mode: str, cfg, world_size: int) -> dict:
    ds_config = ds_config_for(cfg, world_size)
    zero = ds_config["zero_optimization"]
    zero["reduce_bucket_size"] = 1  # see the module docstring
    if mode == "mel-off":
        zero["memory_efficient_linear"] = False
    elif mode == "leaf":
        zero["leaf_module"] = {"classes": ["LlamaDecoderLayer"]}
    return ds_config


def step(mode: str, model_dir: str, out_dir: Path, info) -> None:
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    cfg = tiny_config(model_dir, "train.micro_batch_size=2")
    ds_config = ds_config_of(mode, cfg, info.world_size)
    model, hf_ds = load_model(cfg.model, ds_config, "cpu")
    model = add_lora(model, cfg.lora, cfg.seed)
    randomize_lora_b(model, seed=7)
    plan = sharing_plan(hand_selection(4, cfg.lora.target_modules, KEPT))
    tie_shared_lora(model, plan, train_shared=True)
    engine = create_engine(model, ds_config, lr=1e-3, weight_decay=0.0, lr_factor=lr_lambda("constant", 0, 1, 1.0))
    # Each partitioned trainable parameter is owned once by the optimizer.
    flat = sum(int(g.numel()) for g in engine.optimizer.fp32_partitioned_groups_flat)
    flat_total = torch.tensor([flat], dtype=torch.int64)
    dist.all_reduce(flat_total)
    leaf_modules = sum(1 for m in engine.module.modules() if getattr(m, "_z3_leaf", False))

    batch = rank_batches(cfg, load_tokenizer(model_dir), per_rank=2, world=info.world_size)[info.rank]
    out = engine(**batch)
    engine.backward(out.loss)
    names = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    # A gradient DeepSpeed has reduced into its partition is gone from .grad (stage3.py
    # ``__reduce_and_partition_ipg_grads`` sets it to None); one still there after backward
    # was never reduced. It is dropped before reading: safe_get_full_grad returns .grad when
    # set (utils/tensor_fragment.py, 0.19.8) and the optimizer's reduced partitions, what the
    # step uses, otherwise; and DeepSpeed's zero_grad would call record_stream on it, which a
    # CPU tensor refuses (on CUDA it would be dropped there without a word).
    unreduced = sorted(n for n, p in names if p.grad is not None)
    for _, p in names:
        p.grad = None
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in names}  # collective: every rank
    engine.step()
    params = adapter_io.gather_lora_state(engine.module)
    losses = [None] * info.world_size
    dist.all_gather_object(losses, float(out.loss))
    if info.is_main:
        mode_dir = out_dir / mode
        mode_dir.mkdir(parents=True, exist_ok=True)
        save_file(grads, mode_dir / "grads.safetensors")
        save_file(params, mode_dir / "params.safetensors")
        torch.save({"losses": losses, "optimizer_numel": int(flat_total),
                    "trainable": trainable_parameter_count(engine.module),
                    "deepspeed_linear": torch.nn.functional.linear is zero3_linear_wrap,
                    "leaf_modules": leaf_modules,
                    "unreduced": unreduced}, mode_dir / "meta.pt")
    del model, names, out
    release_engine(engine)
    del engine, hf_ds


def main(model_dir: str, out_dir: str, modes: list[str]) -> None:
    info = distributed.init_distributed()
    for mode in modes or ["default"]:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; known: {MODES}")
        step(mode, model_dir, Path(out_dir), info)
    distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
