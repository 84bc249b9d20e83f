"""Helpers shared by the multi-rank test workers and their single-process references."""

from __future__ import annotations

import torch

from loradrop_ds import config as config_lib
from loradrop_ds import data as data_lib
from loradrop_ds.importance import Selection


def tiny_config(model_dir: str, *overrides: str) -> config_lib.Config:
    return config_lib.load_config(None, [
        f"model.path={model_dir}", "deepspeed=ds_configs/zero3_tiny.json", "lora.dropout=0.0",
        "lora.target_modules=[q_proj,v_proj,down_proj]", "train.max_grad_norm=0", *overrides,
    ])


def ds_config_for(cfg: config_lib.Config, world_size: int) -> dict:
    """The resolved DeepSpeed config of ``cfg``, sized from its model as the CLI does."""
    from loradrop_ds.engine import SizeHints, load_ds_config
    from loradrop_ds.model_dims import read_model_dims

    modules = read_model_dims(cfg.model, cfg.lora.target_modules)
    return load_ds_config(cfg, world_size, SizeHints.for_model(modules, cfg.lora.r))


def randomize_lora_b(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """peft starts B at zero; give it seeded values (before tying, before DeepSpeed) so
    that A receives gradients and LoRA outputs are non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def rank_batches(cfg: config_lib.Config, tokenizer, per_rank: int, world: int) -> list[dict]:
    """Batch r is what rank r trains on: consecutive examples of different lengths."""
    records = data_lib.load_records(cfg.data.train_file, "data.train_file")[: per_rank * world]
    tok = data_lib.tokenize_records(records, tokenizer, cfg.data, "data.train_file")
    batches = [data_lib.collate(tok.examples(range(r * per_rank, (r + 1) * per_rank)), tokenizer.pad_token_id)
               for r in range(world)]
    return [{k: v for k, v in b.items() if k != "token_mask"} for b in batches]  # the model's inputs only


def hand_selection(num_layers: int, modules: list[str], kept_layers: list[int]) -> Selection:
    items = [str(i) for i in range(num_layers)]
    return Selection("layer", 0.9, list(modules), num_layers, items, [1.0] * num_layers,
                     [1.0 / num_layers] * num_layers, 0, [str(i) for i in kept_layers],
                     [str(i) for i in range(num_layers) if i not in kept_layers])


# The tied-step test keeps layers 1 and 3; layers 0 and 2 share one LoRA per module.
TIED_KEPT_LAYERS = [1, 3]
