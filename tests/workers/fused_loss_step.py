"""The fused linear cross-entropy (loradrop_ds.fused_loss, with its plain-torch kernel) under
real ZeRO-3 on 2 ranks.

torchrun --nproc_per_node 2 tests/workers/fused_loss_step.py MODEL_DIR TIED_MODEL_DIR OUT_DIR

* ``untied``: the fused loss attached as load_model does it, LoRA, an evaluation, STEPS
  training steps (each rank its own batch per step), an evaluation. Prefetching is off, so
  whether the LM head's weight is whole somewhere is the release decisions' doing alone; its
  status is recorded as the last decoder layer starts its forward and its backward.
* ``rebuilt``: that engine released and its LoRA stripped (lora.strip_lora), fresh LoRA on
  the same base, one step: what the main stage does on the sampling stage's base.
* ``tied``: a model whose LM head is its input embedding, 2 steps.

Rank 0 writes, per part, PART.safetensors (gradients of the first step, LoRA after the last)
and PART.pt (every rank's losses, evaluation logits, the recorded statuses).
"""

import functools
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from safetensors.torch import save_file

from loradrop_ds import adapter_io, distributed
from loradrop_ds.deepspeed_private import forget_zero3_trace, release_engine
from loradrop_ds.engine import create_engine, lr_lambda
from loradrop_ds.fused_loss import attach_fused_loss, chunked_linear_cross_entropy
from loradrop_ds.lora import add_lora, strip_lora
from loradrop_ds.model import decoder_layers, load_model, load_tokenizer
from workers.common import ds_config_for, randomize_lora_b, rank_batches, tiny_config

STEPS = 3
PER_RANK = 2
CHUNK_TOKENS = 5  # several chunks per micro-batch, the last one short
KERNEL = functools.partial(chunked_linear_cross_entropy, chunk_tokens=CHUNK_TOKENS)
LR = 1e-3


def step_batches(cfg, model_dir, world):
    """batches[step][rank]: consecutive examples of different lengths (workers.common.rank_batches)."""
    flat = rank_batches(cfg, load_tokenizer(model_dir), PER_RANK, world * STEPS)
    return [flat[s * world:(s + 1) * world] for s in range(STEPS)]


def build(cfg, ds_config, lora_seed, b_seed, base=None):
    hf = None
    if base is None:
        base, hf = load_model(cfg.model, ds_config, "cpu")
        attach_fused_loss(base, KERNEL)
    model = add_lora(base, cfg.lora, lora_seed)
    randomize_lora_b(model, seed=b_seed)
    engine = create_engine(model, ds_config, lr=LR, weight_decay=0.0, lr_factor=lr_lambda("constant", 0, 1, 1.0))
    return engine, hf


def evaluate_logits(engine, batch):
    """As training.evaluate: eval mode, no labels, then the trace reset."""
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    engine.train()
    forget_zero3_trace(engine)
    return logits


def train(engine, batches, steps, info):
    """``steps`` steps; every rank's loss per step, the first step's full gradients."""
    losses, grads = [], None
    engine.train()  # as TrainingStage (from_pretrained leaves the model in eval mode)
    for step in range(steps):
        out = engine(**batches[step][info.rank])
        assert out.logits is None  # the fused branch ran: no logits formed
        engine.backward(out.loss)
        if grads is None:
            grads = {n: safe_get_full_grad(p).detach().clone()  # collective: every rank
                     for n, p in engine.module.named_parameters() if p.requires_grad}
        engine.step()
        every = [None] * info.world_size
        dist.all_gather_object(every, float(out.loss))
        losses.append(every)
    return losses, grads


class HeadWatch:
    """The LM head weight's ZeRO-3 status as the last decoder layer starts its forward and
    its backward, and how often lm_head's own forward runs (it must not, in training)."""

    def __init__(self, causal_lm):
        self.weight = causal_lm.lm_head.weight
        self.forward, self.backward, self.head_calls = [], [], 0
        last = decoder_layers(causal_lm)[-1]
        last.register_forward_pre_hook(lambda m, a: self.forward.append(self.weight.ds_status.name))
        last.register_full_backward_pre_hook(lambda m, g: self.backward.append(self.weight.ds_status.name))
        causal_lm.lm_head.register_forward_hook(lambda m, a, o: self._count())

    def _count(self):
        self.head_calls += 1


def save(info, out_dir, part, grads, engine, meta):
    params = adapter_io.gather_lora_state(engine.module)  # collective: every rank
    if info.is_main:
        save_file({f"grad.{n}": g for n, g in grads.items()} | {f"param.{n}": p for n, p in params.items()},
                  f"{out_dir}/{part}.safetensors")
        torch.save(meta, f"{out_dir}/{part}.pt")


def main(model_dir: str, tied_dir: str, out_dir: str) -> None:
    info = distributed.init_distributed()
    cfg = tiny_config(model_dir, f"train.micro_batch_size={PER_RANK}")
    ds_config = ds_config_for(cfg, info.world_size)
    ds_config["zero_optimization"]["stage3_prefetch_bucket_size"] = 0
    batches = step_batches(cfg, model_dir, info.world_size)

    # untied: evaluation, STEPS steps, evaluation
    engine, hf = build(cfg, ds_config, cfg.seed, b_seed=7)
    causal_lm = engine.module.base_model.model
    watch = HeadWatch(causal_lm)
    before = evaluate_logits(engine, batches[0][info.rank])
    eval_head_calls = watch.head_calls
    watch.forward.clear()
    losses, grads = train(engine, batches, STEPS, info)
    train_head_calls = watch.head_calls - eval_head_calls
    after = evaluate_logits(engine, batches[0][info.rank])
    save(info, out_dir, "untied", grads, engine, {
        "losses": losses, "eval_before": before, "eval_after": after, "forward_status": watch.forward,
        "backward_status": watch.backward, "eval_head_calls": eval_head_calls, "train_head_calls": train_head_calls,
        "attached": type(causal_lm.fused_lm_loss).__name__})

    # rebuilt: fresh LoRA on the same partitioned base, the fused loss still attached
    base = strip_lora(release_engine(engine, keep_model=True))
    del engine, causal_lm
    engine, _ = build(cfg, ds_config, cfg.seed + 1, b_seed=8, base=base)
    losses, grads = train(engine, batches, 1, info)
    save(info, out_dir, "rebuilt", grads, engine, {"losses": losses})
    release_engine(engine)
    del engine, base, hf

    # tied: the LM head's weight is the embedding's
    tied_cfg = tiny_config(tied_dir, f"train.micro_batch_size={PER_RANK}")
    engine, hf = build(tied_cfg, ds_config, tied_cfg.seed, b_seed=9)
    causal_lm = engine.module.base_model.model
    tied = causal_lm.lm_head.weight is causal_lm.model.embed_tokens.weight
    losses, grads = train(engine, batches, 2, info)
    save(info, out_dir, "tied", grads, engine, {"losses": losses, "tied": tied})
    distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
